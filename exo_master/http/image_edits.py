"""`/v1/images/edits`: the multipart form OpenAI clients send, decoded into ImageEditsParams.

The body is already bounded in size and read time (http_bounds); here the form's text fields are
converted with msgspec (so a bad `n` or `seed` is a 400 naming it, like a JSON body) and the image
file becomes base64 for the wire.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

import msgspec
from starlette.datastructures import UploadFile
from starlette.requests import Request

from exo_master.http.decoding import param_of
from exo_master.http.errors import invalid, unsupported
from exo_master.http.openai_schema import ImageSize, OnlyOne, Seed
from protocol.ids import ModelId
from protocol.messages import ImageEditsParams


class ImageEditsForm(msgspec.Struct, frozen=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    prompt: Annotated[str, msgspec.Meta(min_length=1)]
    size: ImageSize | None = None
    n: OnlyOne | None = None
    seed: Seed | None = None
    response_format: Literal["b64_json"] | None = None


_FIELDS = frozenset(ImageEditsForm.__struct_fields__)


async def read_image_edits(request: Request) -> tuple[ImageEditsForm, ImageEditsParams]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise invalid("send /v1/images/edits as multipart/form-data", code="invalid_content_type")
    async with request.form(max_files=4, max_fields=32) as form:
        image = form.getlist("image") or form.getlist("image[]")
        if form.get("mask") is not None:
            raise unsupported("mask", "masked edits are not supported; send the image only")
        if len(image) != 1 or not isinstance(image[0], UploadFile):
            raise invalid("send exactly one image file in the 'image' field", "image")
        raw = await image[0].read()
        fields = {k: v for k, v in form.items() if k in _FIELDS and isinstance(v, str)}
    if not raw:
        raise invalid("the image file is empty", "image")
    try:
        body = msgspec.convert(fields, type=ImageEditsForm, strict=False)
    except msgspec.ValidationError as exc:
        raise invalid(f"invalid request: {exc}", param_of(str(exc))) from exc
    params = ImageEditsParams(
        model=ModelId(body.model),
        prompt=body.prompt,
        image_b64=base64.b64encode(raw).decode("ascii"),
        size=body.size or "512x512",
        seed=body.seed,
    )
    return body, params
