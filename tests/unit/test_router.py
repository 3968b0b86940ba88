"""The HTTP router without root: routes in the model, their checks against the store, the
spec and haproxy.cfg built from a view, runtime-API plans, HAProxy's answers parsed, and the
router's namespace planned and applied on the fake kernel."""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest

from kernel.system import fake_kernel
from meshctl import ipam, naming
from meshctl.commands.network import create_network
from meshctl.commands.read import (
    get_network,
    get_router,
    list_certificates,
    list_services,
    network_ipam,
)
from meshctl.commands.router import (
    add_certificate,
    disable_router,
    enable_router,
    remove_certificate,
)
from meshctl.commands.service import create_service, remove_service, update_service
from meshctl.lb.desired import lb_specs
from meshctl.model import (
    INGRESS,
    NetworkAttachment,
    NodeStatus,
    NotFoundError,
    PublishedPort,
    Route,
    Service,
    ValidationError,
)
from meshctl.node.desired import ingress_rules, published_ports
from meshctl.router import haproxy
from meshctl.router.config import RouterFiles, render, slot_count
from meshctl.router.desired import router_spec
from meshctl.router.net import apply_router_net, plan_router_net, router_net_spec
from meshctl.router.slots import Slot, plan_runtime, plan_servers
from meshctl.router.spec import Backend, HttpRoute, RouterSpec, Server, SniRoute
from meshctl.router.sync import ROUTER, ROUTER_STARTING
from meshctl.store import Store
from meshctl.store.sqlite import SqliteStore
from meshctl.view import ClusterView, read_view
from tests.unit.leader import place, settle

# -- the model ---------------------------------------------------------------------------------


def _service(**fields: object) -> Service:
    return Service("web", ("true",), networks=(NetworkAttachment("front"),), **fields)  # type: ignore[arg-type]


def test_routes_read_host_port_path_stickiness_and_tls() -> None:
    service = _service(hostnames=("a.test", "*.b.test:8080"), hostname_path="/api",
                       hostname_sticky=True)  # fmt: skip
    assert service.routes() == (
        Route("a.test", 80, "/api", True), Route("*.b.test", 8080, "/api", True)
    )  # fmt: skip
    passthrough = _service(hostnames=("p.test",), hostname_tls="passthrough")
    assert passthrough.routes() == (Route("p.test", 443, "/", False, "passthrough"),)
    assert Service.from_dict(service.to_dict()) == service


def test_a_record_from_before_routes_reads_as_it_was() -> None:
    old = _service(hostnames=("a.test",)).to_dict()
    for key in ("hostname_path", "hostname_sticky", "hostname_tls"):
        del old[key]
    assert Service.from_dict(old).routes() == (Route("a.test", 80),)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"hostnames": ("A.test",)}, "lowercase DNS name"),
        ({"hostnames": ("a.*.test",)}, "lowercase DNS name"),
        ({"hostnames": ("a.test:http",)}, ":PORT"),
        ({"hostnames": ("a.test:0",)}, "port number"),
        ({"hostnames": ("a.test", "a.test:8080")}, "given twice"),
        ({"hostname_path": "/x"}, "needs --hostname"),
        ({"hostnames": ("a.test",), "hostname_path": "api"}, "starting with /"),
        ({"hostnames": ("a.test",), "hostname_path": "/a b"}, "starting with /"),
        ({"hostnames": ("a.test",), "hostname_path": "/a'b"}, "starting with /"),
        ({"hostnames": ("a.test",), "hostname_tls": "passthrough", "hostname_sticky": True},
         "drop --hostname-path and --hostname-sticky"),
        ({"hostnames": ("a.test",), "hostname_tls": "on"}, "terminate, passthrough"),
    ],
)  # fmt: skip
def test_bad_routes_are_one_line_errors(fields: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says) as caught:
        _service(**fields)
    assert "\n" not in str(caught.value)


# -- against the store -------------------------------------------------------------------------


def _front(store: Store) -> None:
    create_network(store, "front", subnet="10.70.0.0/24")


def test_a_route_another_service_has_or_without_a_network_is_refused(store: Store) -> None:
    _front(store)
    create_service(store, _service(hostnames=("a.test",)))
    with pytest.raises(ValidationError, match="service web already routes a.test; choose"):
        create_service(store, dataclasses.replace(_service(hostnames=("a.test",)), name="x"))
    # Another path, or TLS passthrough of the same host, is another route.
    create_service(store, Service("api", ("true",), networks=(NetworkAttachment("front"),),
                                      hostnames=("a.test",), hostname_path="/api"))  # fmt: skip
    tls = Service("tls", ("true",), networks=(NetworkAttachment("front"),),
                  hostnames=("a.test",), hostname_tls="passthrough")  # fmt: skip
    create_service(store, tls)
    with pytest.raises(ValidationError, match="no network the router could reach"):
        create_service(store, Service("lone", ("true",), hostnames=("l.test",)))
    assert {s.name for s in list_services(store)} == {"web", "api", "tls"}


def test_changing_only_routes_replaces_no_task(store: Store) -> None:
    _front(store)
    create_service(store, _service(hostnames=("a.test",)))
    assert update_service(store, "web", {"hostnames": ("a.test", "b.test")}).version == 1
    assert update_service(store, "web", {"hostname_sticky": True}).version == 1
    assert update_service(store, "web", {"replicas": 2}).version == 2


def test_router_ports_and_service_ports_never_clash(store: Store) -> None:
    _front(store)
    create_service(store, _service(ports=(PublishedPort(8080, 80),)))
    with pytest.raises(ValidationError, match="port 8080/tcp is published by service web"):
        enable_router(store, http_port=8080)
    router = enable_router(store)
    assert router.vip is not None and get_router(store) == router
    with pytest.raises(ValidationError, match="port 443/tcp is the HTTP router's"):
        create_service(store, Service("x", ("true",), ports=(PublishedPort(443, 443),)))
    # Moved: its old port is free again, its id, VIP and cookie key stay.
    moved = enable_router(store, http_port=8000, mode="ingress")
    assert (moved.id, moved.vip, moved.cookie_key) == (router.id, router.vip, router.cookie_key)
    create_service(store, Service("x", ("true",), ports=(PublishedPort(80, 80),)))
    host = enable_router(store, http_port=8000, mode="host")
    assert host.vip is None
    disable_router(store)
    assert get_router(store) is None
    create_service(store, Service("y", ("true",), ports=(PublishedPort(443, 443),)))
    with pytest.raises(NotFoundError, match="not enabled"):
        disable_router(store)


def test_disabling_releases_the_vip_and_every_node_router_address(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "state.db"))
    _front(store)
    enable_router(store)
    network = get_network(store, "front")
    ipam.allocate_node_address(store, network, ipam.router_owner("node1"), "the router")
    assert read_view(store).router_addresses == {("front", "node1"): "10.70.0.2"}
    disable_router(store)
    view = read_view(store)
    assert view.router_addresses == {}
    owners = network_ipam(store, get_network(store, INGRESS)).allocations.values()
    assert not any(o.startswith("vip:") for o in owners)


def _pair(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", f"/CN={name}"],
                   check=True, capture_output=True)  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl (scripts/bootstrap)")
def test_a_certificate_is_stored_only_with_its_own_key(store: Store, tmp_path: Path) -> None:
    cert, key = _pair(tmp_path, "a.test")
    _, other_key = _pair(tmp_path, "b.test")
    with pytest.raises(ValidationError, match="give a PEM certificate and the PEM key"):
        add_certificate(store, "a.test", str(cert), str(other_key))
    with pytest.raises(ValidationError, match="cannot read"):
        add_certificate(store, "a.test", str(tmp_path / "missing"), str(key))
    with pytest.raises(ValidationError, match="invalid certificate host"):
        add_certificate(store, "A b", str(cert), str(key))
    stored = add_certificate(store, "a.test", str(cert), str(key))
    assert "PRIVATE KEY" in stored.key
    assert [c.host for c in list_certificates(store)] == ["a.test"]
    remove_certificate(store, "a.test")
    assert list_certificates(store) == []


# -- the spec from the view --------------------------------------------------------------------


def _routed(tmp_path: Path) -> SqliteStore:
    """front with web (3 tasks on node1: running, unhealthy, starting) behind a.test and
    *.w.test, api behind a.test/api, tls passed through for p.test; the router enabled."""
    store = SqliteStore(str(tmp_path / "state.db"))
    _front(store)
    enable_router(store)
    front = (NetworkAttachment("front"),)
    create_service(store, Service("web", ("true",), replicas=3, networks=front,
                                      hostnames=("a.test", "*.w.test:8080")))  # fmt: skip
    create_service(store, Service("api", ("true",), networks=front, hostnames=("a.test",),
                                      hostname_path="/api", hostname_sticky=True))  # fmt: skip
    create_service(store, Service("tls", ("true",), networks=front, hostnames=("p.test",),
                                      hostname_tls="passthrough"))  # fmt: skip
    settle(store)
    view = read_view(store)
    for task in view.tasks.values():
        placed = place(store, task)
        record = store.get("task", task.id)
        assert record is not None
        health = (
            {1: "none", 2: "unhealthy", 3: "starting"}[task.slot]
            if task.service == "web"
            else "none"
        )
        pid = None if health == "starting" else 100 + task.slot
        store.put("task", task.id, {**placed.to_dict(), "health": health, "pid": pid},
                  expect=record.mod_revision)  # fmt: skip
    for network in ("front", INGRESS):
        ipam.allocate_node_address(
            store, get_network(store, network), ipam.router_owner("node1"), "the router"
        )
    return store


def test_the_spec_has_each_route_in_matching_order_and_servers_as_health_says(
    tmp_path: Path,
) -> None:
    view = read_view(_routed(tmp_path))
    spec = router_spec(view, "node1")
    assert spec is not None
    assert spec.routes == (
        HttpRoute("a.test", "/api", "api.80"),
        HttpRoute("a.test", "/", "web.80"),
        HttpRoute("*.w.test", "/", "web.8080"),
    )
    assert spec.sni_routes == (SniRoute("p.test", "tls.443.passthrough"),)
    web = {b.name: b for b in spec.backends}["web.80"]
    slots = {t.slot: t.addresses["front"] for t in view.tasks.values() if t.service == "web"}
    # Running: ready; unhealthy (its process runs): drained; starting: not a server yet.
    assert web.servers == tuple(sorted((Server(slots[1]), Server(slots[2], ready=False))))
    assert {b.name: b.mode for b in spec.backends}["tls.443.passthrough"] == "tcp"
    assert {b.name: b.sticky for b in spec.backends}["api.80"]
    # Servers change what the runtime API does, not the fingerprint a reload goes by.
    fewer = dataclasses.replace(
        spec, backends=tuple(dataclasses.replace(b, servers=()) for b in spec.backends)
    )
    assert fewer.fingerprint() == spec.fingerprint()
    assert dataclasses.replace(spec, http_port=81).fingerprint() != spec.fingerprint()
    assert router_spec(dataclasses.replace(view, router=None), "node1") is None


def test_the_router_takes_part_in_ingress_and_its_services_first_networks(tmp_path: Path) -> None:
    view = read_view(_routed(tmp_path))
    assert view.router_networks() == {"front", INGRESS}
    assert {"front", INGRESS} <= view.taking_part("node2")


def test_published_through_its_vip_or_to_this_nodes_router(tmp_path: Path) -> None:
    store = _routed(tmp_path)
    ipam.allocate_lb_address(store, get_network(store, INGRESS), "node1")
    view = read_view(store)
    assert view.router is not None and view.router.vip is not None
    here = view.router_addresses[(INGRESS, "node1")]
    assert published_ports(view)[(80, "tcp")] == view.router.id
    catch, masquerade = ingress_rules(view, "node1")
    dnats = {r.target_args for r in catch}
    assert (("to-destination", f"{view.router.vip}:80"),) in dnats
    assert any(r.destination == f"{view.router.vip}/32" for r in masquerade)
    ingress = next(
        s for s in lb_specs(view, "node1", "n1") if s.network_id == view.networks[INGRESS].id
    )
    (vip,) = [v for v in ingress.vips if v.service_id == view.router.id]
    assert [b.address for b in vip.backends] == [here]
    enable_router(store, mode="host")
    view = read_view(store)
    catch, masquerade = ingress_rules(view, "node1")
    assert (("to-destination", f"{here}:443"),) in {r.target_args for r in catch}
    assert not masquerade


# -- haproxy.cfg -------------------------------------------------------------------------------


def _spec() -> RouterSpec:
    return RouterSpec(
        80, 443, "k" * 32,
        routes=(HttpRoute("a.test", "/api", "api.80"), HttpRoute("*.w.test", "/", "web.80")),
        sni_routes=(SniRoute("p.test", "tls.443.passthrough"),),
        backends=(
            Backend("api.80", "api", 80, sticky=True, servers=(Server("10.0.0.2"),)),
            Backend("web.80", "web", 80, servers=tuple(Server(f"10.0.0.{i}") for i in range(3, 8))),
            Backend("tls.443.passthrough", "tls", 443, "tcp"),
        ),
    )  # fmt: skip


def test_the_configuration_routes_by_host_and_path_in_order(tmp_path: Path) -> None:
    text = render(_spec(), RouterFiles(str(tmp_path)))
    uses = [line.strip() for line in text.splitlines() if "use_backend" in line]
    assert uses[:2] == [
        "use_backend api.80 if { var(txn.host) -m str a.test } { path /api } || "
        "{ var(txn.host) -m str a.test } { path_beg /api/ }",
        "use_backend web.80 if { var(txn.host) -m end .w.test }",
    ]
    assert "use_backend tls.443.passthrough if { req.ssl_sni,lower -m str p.test }" in uses
    assert 'lf-string "no route for host %[var(txn.host)]\\n"' in text
    assert "cookie meshctl-api insert indirect nocache dynamic" in text
    assert "https-terminated" not in text  # no certificate: TLS other than passthrough refused
    # Room to double: 5 servers get 16 slots, the unused ones empty and disabled.
    assert slot_count(5) == 16 and "server s16 0.0.0.0:80 disabled" in text
    assert "server s5 10.0.0.7:80\n" in text


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (scripts/bootstrap)")
def test_haproxy_accepts_the_configuration_and_install_refuses_a_bad_one(tmp_path: Path) -> None:
    files = RouterFiles(str(tmp_path / "router"))
    spec = dataclasses.replace(_spec(), certificates=())
    haproxy.install(files, render(spec, files))
    good = Path(files.config).read_text()
    with pytest.raises(
        haproxy.RouterError, match="haproxy refuses the configuration: .*balance only supports"
    ):
        haproxy.install(files, good.replace("balance roundrobin", "balance nonsense", 1))
    assert Path(files.config).read_text() == good  # the refused one was never installed
    assert Path(files.config).stat().st_mode & 0o777 == 0o600


# -- runtime API -------------------------------------------------------------------------------


def _slots(*held: tuple[str, bool]) -> list[Slot]:
    taken = [Slot(f"s{i}", address, 80, ready) for i, (address, ready) in enumerate(held, 1)]
    return taken + [Slot(f"s{i}", "0.0.0.0", 80, False) for i in range(len(held) + 1, 5)]


def test_servers_keep_their_slots_new_ones_take_free_ones_and_gone_ones_drain() -> None:
    backend = Backend("web.80", "web", 80, servers=(Server("10.0.0.2"), Server("10.0.0.4"),
                                                    Server("10.0.0.5", ready=False)))  # fmt: skip
    slots = _slots(("10.0.0.2", True), ("10.0.0.3", True), ("10.0.0.5", True))
    assert plan_servers(backend, slots) == [
        # New ones first (an empty slot before the one a removed server leaves)...
        "set server web.80/s4 addr 10.0.0.4 port 80",
        "set server web.80/s4 state ready",
        # ...then what stops taking requests.
        "set server web.80/s3 state maint",
        "set server web.80/s2 state maint",
    ]
    assert plan_servers(backend, [*slots[:3], Slot("s4", "10.0.0.4", 80, True)]) == [
        "set server web.80/s3 state maint",
        "set server web.80/s2 state maint",
    ]
    converged = [Slot("s1", "10.0.0.2", 80, True), Slot("s2", "10.0.0.3", 80, False),
                 Slot("s3", "10.0.0.5", 80, False), Slot("s4", "10.0.0.4", 80, True)]  # fmt: skip
    assert plan_servers(backend, converged) == []
    # More new servers than free slots: only a reload can size them.
    many = Backend("web.80", "web", 80, servers=tuple(Server(f"10.0.1.{i}") for i in range(5)))
    assert plan_servers(many, slots) is None


def test_without_a_reload_only_the_backends_that_fit_change() -> None:
    spec = _spec()
    running = {"api.80": _slots(("10.0.0.9", True))}  # web.80 is new, tls.443 too
    assert plan_runtime(spec, running) is None  # a reload is needed
    assert plan_runtime(spec, running, partial=True) == [
        "set server api.80/s2 addr 10.0.0.2 port 80",
        "set server api.80/s2 state ready",
        "set server api.80/s1 state maint",
    ]


def test_haproxys_answers_are_read() -> None:
    proc = (
        "#<PID>          <type>          <reloads>       <uptime>        <version>\n"
        "29117           master          3 [failed: 1]   0d00h00m01s     2.6.12-1+deb12u4\n"
        "# workers\n"
        "29191           worker          0               0d00h00m00s     2.6.12-1+deb12u4\n"
        "29150           worker          1               0d00h00m01s     2.6.12-1+deb12u4\n"
        "# programs\n"
    )
    assert haproxy.parse_proc(proc) == (3, 1, 29191)
    state = (
        "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
        "srv_iweight srv_time_since_last_change srv_check_status srv_check_result "
        "srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id "
        "srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr "
        "srv_agent_port\n"
        "6 a.80 1 s1 10.0.0.2 2 0 1 1 0 1 0 2 0 0 0 0 - 80 - 0 0 - - 0\n"
        "6 a.80 2 s2 10.0.0.3 0 5 1 1 0 1 0 0 8 0 0 0 - 80 - 0 0 - - 0\n\n"
    )
    assert haproxy.parse_servers_state(state) == {
        "a.80": [Slot("s1", "10.0.0.2", 80, True), Slot("s2", "10.0.0.3", 80, False)]
    }
    header = "# pxname,svname,qcur,qmax,scur,smax,addr,cookie"
    stat = "\n".join([header, "a.80,s1,0,0,2,3,10.0.0.2:80,", "b.80,s1,0,0,1,1,10.0.0.2:80,",
                      "a.80,BACKEND,0,0,3,3,,", "a.80,s2,0,0,0,0,10.0.0.3:80,"])  # fmt: skip
    assert haproxy.parse_stat(stat) == {"10.0.0.2": 3, "10.0.0.3": 0}


# -- the router's namespace --------------------------------------------------------------------


def test_the_namespace_gets_a_leg_per_network_and_loses_only_the_one_it_leaves(
    tmp_path: Path,
) -> None:
    store = _routed(tmp_path)
    view: ClusterView = read_view(store)
    kernel = fake_kernel()
    node_id = "abcdef012345"
    desired = router_net_spec(view, "node1", node_id)
    assert desired is not None
    assert [leg.task_end for leg in desired.links] == [
        naming.container_interface(view.networks[INGRESS].id),  # first: the default route's
        naming.container_interface(view.networks["front"].id),
    ]
    assert desired.gateway == view.gateways[INGRESS]
    for network in ("front", INGRESS):  # the bridges, as the node's reconciler makes them
        kernel.links.ensure_bridge(None, naming.bridge(view.networks[network].id))
    plan = plan_router_net(kernel, desired, node_id)
    assert plan.create_netns and len(plan.wire) == 2
    apply_router_net(kernel, plan, desired)
    assert not plan_router_net(kernel, desired, node_id)
    # The services leave: the router leaves front; its ingress leg is left as it was.
    for name in ("web", "api", "tls"):
        remove_service(store, name)
    view = read_view(store)
    ipam.release_node_address(store, view.networks["front"], ipam.router_owner("node1"))
    smaller = router_net_spec(read_view(store), "node1", node_id)
    assert smaller is not None and len(smaller.links) == 1
    plan = plan_router_net(kernel, smaller, node_id)
    assert plan.delete_legs == (naming.router_veth(view.networks["front"].id),) and not plan.wire
    apply_router_net(kernel, plan, smaller)
    assert not plan_router_net(kernel, smaller, node_id)
    # Disabled: the namespace goes.
    plan = plan_router_net(kernel, None, node_id)
    assert plan.delete_netns
    apply_router_net(kernel, plan, None)
    assert not kernel.netns.exists(naming.router_netns(node_id))


def test_a_node_back_joins_the_router_vip_after_its_first_pass(tmp_path: Path) -> None:
    """A node that came back has no HAProxy listening until its first pass: the others' routing
    mesh leaves its router out until its status says the pass ran (#27)."""
    store = _routed(tmp_path)
    ipam.allocate_lb_address(store, get_network(store, INGRESS), "node1")
    view = read_view(store)
    here = view.router_addresses[(INGRESS, "node1")]
    there = str(ipaddress.IPv4Address(here) + 50)
    ingress = dataclasses.replace(view.networks[INGRESS], driver="overlay", vni=4196)

    def backends(node2: NodeStatus) -> list[str]:
        changed = dataclasses.replace(
            view,
            networks={**view.networks, INGRESS: ingress},
            router_addresses={**view.router_addresses, (INGRESS, "node2"): there},
            statuses={"node1": NodeStatus("node1"), "node2": node2},
        )
        (spec,) = [s for s in lb_specs(changed, "node1", "n1") if s.network_id == ingress.id]
        (vip,) = [v for v in spec.vips if v.service_id == view.router.id]  # type: ignore[union-attr]
        return [b.address for b in vip.backends]

    assert backends(NodeStatus("node2", errors={ROUTER: ROUTER_STARTING})) == [here]
    assert backends(NodeStatus("node2")) == [here, there]
    # A router that fails later may still serve its last good configuration: it stays.
    assert backends(NodeStatus("node2", errors={ROUTER: "haproxy -c refused"})) == [here, there]
