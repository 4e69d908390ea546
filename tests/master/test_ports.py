"""Free ports for local clusters: every port of one cluster differs from the others."""

from exo_master.devtools.ports import free_cluster_ports, free_ports, port_is_free


def test_a_clusters_three_ports_are_all_different_and_free() -> None:
    for _ in range(200):  # separate picks once gave the API and the bus the same port
        api, bus = free_cluster_ports()
        assert len({api, bus, bus + 1}) == 3
        assert all(port_is_free("127.0.0.1", port) for port in (api, bus, bus + 1))


def test_given_ports_are_kept_and_never_picked_again() -> None:
    api, bus = free_cluster_ports()
    for _ in range(50):
        assert free_cluster_ports(api_port=api)[0] == api
        kept_api, kept_bus = free_cluster_ports(bus_port=bus)
        assert kept_bus == bus and kept_api not in (bus, bus + 1)


def test_ring_ports_are_all_different() -> None:
    for _ in range(50):
        ports = free_ports(6)
        assert len(set(ports)) == 6
