"""The mDNS advert: its TXT record round-trips, junk from the LAN is ignored, the right master is
chosen (or one clear line says why none), and a worker refuses a master whose key it does not know."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exo_master.bus.advertise import AdvertiseSettings, plan_advertiser
from protocol.discovery import SERVICE_TYPE, Advert, DiscoveryError, check_key, choose, parse_advert


def advert(cluster: str = "home", name: str | None = None, key: str | None = "0123456789abcdef") -> Advert:
    return Advert(
        name=name or f"{cluster}@studio",
        cluster=cluster,
        addresses=("192.168.1.20",),
        bus_port=52416,
        api_port=52415,
        key=key,
        session=f"s-{cluster}-{name}",
        version="0.1.0",
    )


@pytest.mark.parametrize("key", ["0123456789abcdef", None])
def test_the_txt_record_round_trips(key: str | None) -> None:
    sent = advert(key=key)
    as_bytes = {k.encode(): v.encode() for k, v in sent.properties().items()}
    got = parse_advert(f"{sent.name}.{SERVICE_TYPE}", ["192.168.1.20"], as_bytes)
    assert got == sent
    assert got is not None and got.bus == "192.168.1.20:52416" and got.api == "http://192.168.1.20:52415"
    assert sent.properties()["bus_in"] == "52417"


def test_a_lan_address_comes_before_loopback_and_ipv4_before_ipv6() -> None:
    props = advert().properties()
    got = parse_advert("x", ["::1", "127.0.0.1", "fe80::1", "10.0.0.5", "junk"], props)
    assert got is not None and got.addresses[0] == "10.0.0.5" and "junk" not in got.addresses


@pytest.mark.parametrize(
    ("field", "value"),
    [("v", "2"), ("cluster", "bad name!"), ("bus", "0"), ("bus", "65535"), ("api", "x"), ("key", "ZZ"),
     ("session", "a b"), ("cluster", "")],
)  # fmt: skip
def test_a_record_that_does_not_parse_is_ignored(field: str, value: str) -> None:
    props = {**advert().properties(), field: value}
    assert parse_advert("x", ["10.0.0.5"], props) is None
    assert parse_advert("x", [], advert().properties()) is None  # no address: nowhere to go


@given(
    st.dictionaries(st.binary(max_size=12), st.one_of(st.none(), st.binary(max_size=40)), max_size=10),
    st.lists(st.text(max_size=20), max_size=4),
)
def test_anything_on_the_lan_may_answer_and_never_breaks_the_parser(
    props: dict[bytes, bytes | None], addresses: list[str]
) -> None:
    parse_advert("anything", addresses, props)


def test_the_only_master_is_joined_and_a_named_cluster_picks_among_several() -> None:
    home, lab = advert("home"), advert("lab")
    assert choose([home], None) == home
    assert choose([home, lab], "lab") == lab
    with pytest.raises(DiscoveryError, match=r"several clusters answer \(home, lab\).*--cluster"):
        choose([lab, home], None)
    with pytest.raises(DiscoveryError, match="no exo master answered on the LAN for cluster 'x'"):
        choose([home, lab], "x")
    with pytest.raises(DiscoveryError, match="several masters advertise cluster 'home'"):
        choose([home, advert("home", name="home@laptop")], "home")


def test_discovery_never_bypasses_the_master_key() -> None:
    check_key(advert(key="0123456789abcdef"), "0123456789abcdef")
    check_key(advert(key=None), None)
    with pytest.raises(DiscoveryError, match="advertises key 0123456789abcdef, not ffffffffffffffff"):
        check_key(advert(key="0123456789abcdef"), "ffffffffffffffff")
    with pytest.raises(DiscoveryError, match="advertises a plaintext bus"):
        check_key(advert(key=None), "ffffffffffffffff")
    with pytest.raises(DiscoveryError, match="runs CURVE"):
        check_key(advert(key="0123456789abcdef"), None)


def test_a_loopback_master_advertises_only_when_asked() -> None:
    plan = lambda wanted, host: plan_advertiser(  # noqa: E731
        AdvertiseSettings(wanted=wanted, cluster="home"), host, 52416, 52415, None, "sess1"
    )
    advertiser, why = plan(None, "127.0.0.1")
    assert advertiser is None and "--advertise" in why
    assert plan(False, "0.0.0.0")[0] is None
    assert plan(False, "10.1.2.3")[0] is None
    forced, _ = plan(True, "127.0.0.1")
    assert forced is not None
    assert forced.interfaces == ["127.0.0.1"] and forced.advert.addresses == ("127.0.0.1",)
    bound, _ = plan(None, "10.1.2.3")
    assert bound is not None and bound.interfaces == ["10.1.2.3"]
    assert plan(None, "fd00::2")[0] is None  # IPv4 announcements only
    everywhere, _ = plan(None, "0.0.0.0")
    if everywhere is not None:  # every interface: the host's own LAN addresses, never loopback
        assert everywhere.interfaces is None
        assert "127.0.0.1" not in everywhere.advert.addresses
