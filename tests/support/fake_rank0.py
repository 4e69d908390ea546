"""A stand-in for exo_worker.distributed.rank0_process: speaks its frames, runs no model.

    python tests/support/fake_rank0.py [ignored flags]

The Init frame's model name picks how it loads: "fail-load" answers LoadFailed, "stubborn" loads
but ignores Close (the worker must kill it), "silent" never answers; anything else loads. Each
Run's last message picks what the run does:
    "echo WORDS"  one Text frame per word, then Done (stop)
    "hang"        nothing until a Cancel for it arrives, then Done (cancelled)
    "lose"        Lost("rank 1 silent for 3.0 s"), then exit 3 (like a real rank 0)
    "garbage"     a frame that is not one of ours
"""

from __future__ import annotations

import os
import sys

from exo_worker.distributed.frames import (
    Cancel,
    Close,
    Done,
    FromChild,
    Init,
    Loaded,
    LoadFailed,
    Lost,
    Progress,
    Run,
    Snapshot,
    Text,
    decode,
    encode,
    read_body,
    to_child,
)
from protocol.messages import FinishReason, InstanceWork, PromptCacheStats, TextGenerationParams, Usage


def send(frame: FromChild) -> None:
    sys.stdout.buffer.write(encode(frame))
    sys.stdout.buffer.flush()


def main() -> None:
    stubborn = False
    hanging: set[int] = set()
    while (body := read_body(sys.stdin.buffer)) is not None:
        frame = decode(to_child, body)
        if isinstance(frame, Init):
            if frame.model == "silent":
                continue
            if frame.model == "fail-load":
                send(LoadFailed(error="cannot load shard 0 of fail-load: no weights"))
                os._exit(4)
            stubborn = frame.model == "stubborn"
            send(Progress(what="loading this rank's shard", fraction=0.5))
            work = InstanceWork(decoding=1, decode_rate=12.5)
            send(Snapshot(work=work, prompt_cache=PromptCacheStats(budget_bytes=1000), context_length=123))
            send(Loaded())
        elif isinstance(frame, Run):
            assert isinstance(frame.params, TextGenerationParams)
            command = str(frame.params.messages[-1].content)
            if command.startswith("echo "):
                words = command.split()[1:]
                for word in words:
                    send(Text(run=frame.run, text=word))
                send(
                    Done(
                        run=frame.run,
                        finish_reason=FinishReason.STOP,
                        usage=Usage(completion_tokens=len(words)),
                    )
                )
            elif command == "hang":
                hanging.add(frame.run)
            elif command == "lose":
                send(Lost(reason="rank 1 silent for 3.0 s"))
                os._exit(3)
            elif command == "garbage":
                sys.stdout.buffer.write(b"\x00\x00\x00\x03abc")
                sys.stdout.buffer.flush()
        elif isinstance(frame, Cancel) and frame.run in hanging:
            hanging.discard(frame.run)
            send(Done(run=frame.run, finish_reason=FinishReason.CANCELLED, usage=Usage()))
        elif isinstance(frame, Close) and not stubborn:
            os._exit(0)
    os._exit(3)  # stdin closed: the worker is gone


if __name__ == "__main__":
    main()
