"""The model's validation rules (each with the message a user reads), parsing and round trips."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from meshctl.durations import DurationError, format_duration, parse_duration
from meshctl.model import (
    Constraint,
    Container,
    CorruptRecordError,
    HealthCheck,
    Network,
    NetworkAttachment,
    Node,
    NodeStatus,
    PublishedPort,
    RestartPolicy,
    Service,
    Task,
    ValidationError,
    from_record,
    new_id,
)


def svc(**overrides: Any) -> Service:
    fields: dict[str, Any] = {"name": "web", "command": ("sleep", "infinity")}
    fields.update(overrides)
    return Service(**fields)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("5s", 5.0), ("1m30s", 90.0), ("1h", 3600.0), ("1.5s", 1.5), ("0", 0.0)],
)
def test_durations_parse_as_docker_writes_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5", "", "s", "5 s", "1x", "-5s", "5s3"])
def test_bad_durations_say_how_to_write_one(text: str) -> None:
    with pytest.raises(DurationError, match=r"invalid --health-interval .*like 500ms, 5s or 1m30s"):
        parse_duration(text, "--health-interval")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.5, "500ms"), (5.0, "5s"), (90.0, "1m30s"), (3600.0, "1h0m0s"), (0, "0s")],
)
def test_durations_print_back_in_go_notation(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("name", ["Web", "web_1", "-web", "web-", "", "a" * 64, "wéb", "a.b"])
def test_names_must_be_dns_labels(name: str) -> None:
    message = rf"invalid service name '{name}': use 1-63 lowercase letters, digits and '-'"
    with pytest.raises(ValidationError, match=message):
        svc(name=name)
    with pytest.raises(ValidationError, match="invalid network name"):
        Network(name, "10.1.0.0/24")


def test_longest_dns_label_is_accepted() -> None:
    assert Network("a" * 63, "10.1.0.0/24").name == "a" * 63


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_ports_must_be_1_to_65535(port: int) -> None:
    with pytest.raises(ValidationError, match=rf"invalid published port {port}: use a port number"):
        PublishedPort(port, 80)
    with pytest.raises(ValidationError, match=rf"invalid target port {port}: use a port number"):
        PublishedPort(80, port)


def test_the_same_published_port_and_protocol_twice_is_rejected() -> None:
    with pytest.raises(ValidationError, match="port 8000/tcp is published twice"):
        svc(ports=(PublishedPort(8000, 80), PublishedPort(8000, 81)))
    # The same number on another protocol is another port.
    assert len(svc(ports=(PublishedPort(53, 53), PublishedPort(53, 53, "udp"))).ports) == 2


def test_replicas_must_not_be_negative() -> None:
    with pytest.raises(
        ValidationError, match=r"invalid replicas -1: use a whole number, 0 or more"
    ):
        svc(replicas=-1)
    assert svc(replicas=0).replicas == 0


def test_dnsrr_with_an_ingress_port_is_rejected_as_docker_does() -> None:
    with pytest.raises(ValidationError, match="endpoint mode dnsrr has no VIP .* use mode=host"):
        svc(endpoint_mode="dnsrr", ports=(PublishedPort(8000, 80),))
    host = svc(
        endpoint_mode="dnsrr",
        networks=(NetworkAttachment("front"),),
        ports=(PublishedPort(8000, 80, mode="host"),),
    )
    assert host.ports[0].mode == "host"


def test_a_service_needs_a_command() -> None:
    with pytest.raises(ValidationError, match="no command; put it after '--'"):
        svc(command=())


def test_a_network_given_twice_is_rejected() -> None:
    with pytest.raises(ValidationError, match="invalid networks front: given twice"):
        svc(networks=(NetworkAttachment("front"), NetworkAttachment("front", ("x",))))


def test_bad_aliases_env_keys_and_hostnames_are_named() -> None:
    with pytest.raises(ValidationError, match="invalid alias on network front 'WWW'"):
        NetworkAttachment.parse("front:WWW")
    with pytest.raises(ValidationError, match="invalid env key '1A'"):
        svc(env={"1A": "x"})
    with pytest.raises(ValidationError, match="invalid hostnames 'Bad_Host'"):
        svc(hostnames=("Bad_Host",))
    assert svc(hostnames=("www.example.com",)).hostnames == ("www.example.com",)


def test_enumerations_list_their_choices() -> None:
    with pytest.raises(ValidationError, match="invalid endpoint_mode 'rr': use one of vip, dnsrr"):
        svc(endpoint_mode="rr")
    with pytest.raises(ValidationError, match="invalid protocol 'sctp': use one of tcp, udp"):
        PublishedPort(1, 1, "sctp")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="invalid restart.condition 'always'"):
        RestartPolicy("always")  # type: ignore[arg-type]
    with pytest.raises(
        ValidationError, match="invalid driver 'macvlan': use one of bridge, overlay"
    ):
        Network("n", "10.1.0.0/24", "macvlan")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="invalid VNI 0 of overlay network n"):
        Network("n", "10.1.0.0/24", "overlay")
    assert Network("n", "10.1.0.0/24", "overlay", vni=4096).overlay


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.1.0.1/24", "no host bits set"),
        ("banana", "write an IPv4 network in CIDR form"),
        ("fd00::/64", "use an IPv4 network of /29 or larger"),
        ("10.1.0.0/30", "use an IPv4 network of /29 or larger"),
    ],
)
def test_subnets_must_be_ipv4_networks_of_at_least_29(text: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Network("n", text)


@pytest.mark.parametrize(
    ("text", "port"),
    [
        ("8000:80", PublishedPort(8000, 80)),
        ("53:5353/udp", PublishedPort(53, 5353, "udp")),
        ("mode=host,8080:80/tcp", PublishedPort(8080, 80, mode="host")),
        ("mode=ingress,traffic=local,8000:80", PublishedPort(8000, 80, traffic="local")),
    ],
)
def test_publish_syntax(text: str, port: PublishedPort) -> None:
    assert PublishedPort.parse(text) == port


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8000", "write PUBLISHED:TARGET"),
        ("a:80", "write PUBLISHED:TARGET"),
        ("8000:80/sctp", "invalid protocol 'sctp'"),
        ("size=1,8000:80", "unknown setting 'size=1'"),
        ("mode=edge,8000:80", "invalid publish mode 'edge'"),
        ("mode=host,traffic=local,8000:80", "traffic=local needs mode=ingress"),
        ("70000:80", "invalid published port 70000"),
    ],
)
def test_bad_publish_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PublishedPort.parse(text)


def test_network_argument_with_aliases() -> None:
    assert NetworkAttachment.parse("front") == NetworkAttachment("front")
    assert NetworkAttachment.parse("front:www,api") == NetworkAttachment("front", ("www", "api"))


def test_health_checks() -> None:
    assert HealthCheck.parse_http("8080/healthz") == (8080, "/healthz")
    assert HealthCheck.parse_http("8080") == (8080, "/")
    with pytest.raises(ValidationError, match="invalid health.http 'x/y': write PORT/PATH"):
        HealthCheck.parse_http("x/y")
    with pytest.raises(ValidationError, match="invalid health.tcp.port 0"):
        HealthCheck("tcp", port=0)
    with pytest.raises(ValidationError, match="invalid health.command: the command is empty"):
        HealthCheck("cmd", command=" ")
    with pytest.raises(ValidationError, match="invalid health.retries -1"):
        HealthCheck("tcp", port=80, retries=-1)
    with pytest.raises(ValidationError, match="use a duration above 0"):
        HealthCheck("tcp", port=80, interval=0)
    assert HealthCheck("http", port=80, path="/h", interval=5).describe() == "http 80/h every 5s"


def test_every_object_round_trips_through_its_dict() -> None:
    service = svc(
        replicas=2,
        env={"A": "1"},
        networks=(NetworkAttachment("front", ("www",), "10.10.0.2"),),
        ports=(PublishedPort(8000, 80, traffic="local"), PublishedPort(53, 53, "udp", "host")),
        health=HealthCheck("cmd", command="true", interval=2.5),
        restart=RestartPolicy("on-failure", 1.0, 3),
        stop_grace_period=0.5,
        hostnames=("web.example.com",),
    )
    assert Service.from_dict(service.to_dict()) == service
    assert service.vips() == {"front": "10.10.0.2"}
    network = Network("front", "10.10.0.0/24", internal=True, labels={"k": "v"})
    assert Network.from_dict(network.to_dict()) == network
    task = Task("web", service.id, 1, 1, addresses={"front": "10.10.0.3"}, pid=7)
    assert Task.from_dict(task.to_dict()) == task
    assert task.to_dict()["name"] == "web.1"
    node = Node("node1", "192.0.2.1", labels={"zone": "a"}, availability="drain")
    assert Node.from_dict(node.to_dict()) == node
    status = NodeStatus("node1", since=1.0, message="degraded: x", errors={"front": "full"})
    assert NodeStatus.from_dict({**status.to_dict(), "lease": 7}) == status
    placed = replace(service, constraints=("node.labels.zone==a",), max_replicas_per_node=2)
    assert Service.from_dict(placed.to_dict()) == placed


def test_ids_are_12_hex_characters_and_differ() -> None:
    ids = {new_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in ids)
    assert svc().id != svc().id


# -- hardening (#14): names, numbers, reserved ranges, limits, stored records -----------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Network("web\n", "10.1.0.0/24"), "invalid network name"),
        (lambda: svc(name="web\n"), "invalid service name"),
        (lambda: svc(env={"A\n": "1"}), "invalid env key"),
        (lambda: svc(hostnames=("a.com\n",)), "invalid hostnames"),
        (lambda: Node("node1\n"), "invalid node name"),
        (lambda: NetworkAttachment("front", ("www\n",)), "invalid alias"),
        (lambda: Container("c\n", "/run/netns/x", "front", "n1"), "invalid container name"),
        (lambda: Container("c", "/run/netns/x", "front", "n1\n"), "invalid node name"),
        (lambda: Container("c", "/run/netns/x\n", "front", "n1"), "invalid netns"),
        (lambda: Network("n", "10.1.0.0/24", labels={"team\n": "a"}), "invalid labels key"),
        (lambda: Network("n", "10.1.0.0/24", labels={"team": "a\nb"}), "labels team value"),
    ],
)
def test_a_trailing_newline_is_refused_everywhere(make: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("²:80", "write PUBLISHED:TARGET"),
        ("٣:80", "write PUBLISHED:TARGET"),
        ("80:+80", "write PUBLISHED:TARGET"),
        ("9" * 400 + ":80", "write PUBLISHED:TARGET"),
        ("-5:80", "invalid published port -5"),
    ],
)
def test_published_ports_are_ascii_decimal(text: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PublishedPort.parse(text)


@pytest.mark.parametrize("text", ["²/x", "٣/x", " 80/x", "9" * 5000])
def test_health_http_ports_are_ascii_decimal(text: str) -> None:
    with pytest.raises(ValidationError, match="write PORT/PATH"):
        HealthCheck.parse_http(text)


def test_numbers_and_durations_take_ascii_digits_only() -> None:
    from meshctl.model import parse_int

    assert parse_int("-12", "x") == -12
    for text in ["²", "٣", "+3", " 3", "1_000", "", "--5", "3\n", "9" * 19]:
        with pytest.raises(ValidationError, match="write a whole number in digits 0-9"):
            parse_int(text, "x")
    for text in ["٣s", "9" * 400 + "h", "2562048h"]:
        with pytest.raises(DurationError, match="invalid duration"):
            parse_duration(text)


@pytest.mark.parametrize(
    "subnet",
    [
        "0.0.0.0/8",
        "0.0.0.0/0",
        "127.0.0.0/24",
        "126.0.0.0/7",
        "169.254.3.0/24",
        "224.0.0.0/24",
        "239.1.0.0/16",
        "240.0.0.0/24",
        "255.255.255.248/29",
    ],
)
def test_reserved_ranges_are_refused_as_subnets(subnet: str) -> None:
    from meshctl.model import check_not_reserved

    with pytest.raises(ValidationError, match=f"invalid subnet {subnet}: it overlaps"):
        Network("n", subnet)
    with pytest.raises(ValidationError, match="MESHCTL_ADDRESS_POOL .* use a private range"):
        check_not_reserved(subnet, "$MESHCTL_ADDRESS_POOL")
    check_not_reserved("10.0.0.0/8")
    check_not_reserved("100.64.0.0/10")


def test_service_limits() -> None:
    from meshctl.model import MAX_SERVICE_NETWORKS, REPLICAS_CEILING, SERVICE_NAME_MAX

    assert SERVICE_NAME_MAX + len(f".{REPLICAS_CEILING}") == 64  # Linux's hostname limit
    assert svc(name="a" * SERVICE_NAME_MAX).name == "a" * SERVICE_NAME_MAX
    with pytest.raises(ValidationError, match=f"use at most {SERVICE_NAME_MAX}"):
        svc(name="a" * (SERVICE_NAME_MAX + 1))
    assert svc(replicas=REPLICAS_CEILING).replicas == REPLICAS_CEILING
    with pytest.raises(ValidationError, match="at most 1,000,000 tasks"):
        svc(replicas=REPLICAS_CEILING + 1)
    networks = tuple(NetworkAttachment(f"n{i}") for i in range(MAX_SERVICE_NETWORKS + 1))
    assert len(svc(networks=networks[:-1]).networks) == 16
    with pytest.raises(ValidationError, match="on 17 networks, at most 16"):
        svc(networks=networks)


def test_host_mode_and_local_traffic_need_a_network_of_the_service() -> None:
    for port in (PublishedPort(8000, 80, mode="host"), PublishedPort(8000, 80, traffic="local")):
        with pytest.raises(ValidationError, match="add --network NAME"):
            svc(ports=(port,))
        with pytest.raises(ValidationError, match="add --network NAME"):
            svc(ports=(port,), networks=(NetworkAttachment("ingress"),))
        assert svc(ports=(port,), networks=(NetworkAttachment("front"),)).ports == (port,)
    assert svc(ports=(PublishedPort(8000, 80),)).ports  # the routing mesh needs none


def test_text_a_process_cannot_take_is_refused() -> None:
    with pytest.raises(ValidationError, match="command argument .* NUL byte"):
        svc(command=("echo", "a\0b"))
    with pytest.raises(ValidationError, match="env A value .* NUL byte"):
        svc(env={"A": "a\0b"})
    with pytest.raises(ValidationError, match="not valid UTF-8"):
        svc(command=("echo", "\udcff"))
    with pytest.raises(ValidationError, match="invalid health.path"):
        HealthCheck("http", port=80, path="/x HTTP/1.0\r\nHost: y")


def test_stored_records_that_the_model_refuses_are_named() -> None:
    from meshctl.model import CorruptRecordError, from_record
    from meshctl.store import Record

    network = Network("front", "10.1.0.0/24")
    good = Record("network", "front", network.to_dict(), 1, 1)
    assert from_record(Network, good) == network
    broken = [
        {"name": "front"},
        {**network.to_dict(), "subnet": "banana"},
        {**network.to_dict(), "labels": 3},
        ["not", "an", "object"],
    ]
    for value in broken:
        record = Record("network", "front", value, 1, 1)  # type: ignore[arg-type]
        with pytest.raises(
            CorruptRecordError,
            match=r"^network front: stored record is invalid \(.*\); remove it with: "
            r"meshctl store rm network front$",
        ):
            from_record(Network, record)


def test_a_container_knows_its_pid_and_keeps_its_start_time() -> None:
    attached = Container("c", "/proc/42/ns/net", "front", "n1", start_time=1234)
    assert (attached.pid, Container.from_dict(attached.to_dict())) == (42, attached)
    assert Container("c", "/run/netns/x", "front", "n1").pid is None
    assert Container("c", "/proc/self/ns/net", "front", "n1").pid is None
    old = {k: v for k, v in attached.to_dict().items() if k != "start_time"}
    assert Container.from_dict(old).start_time is None  # records from before the field


def test_constraints_read_as_docker_writes_them_and_match_nodes() -> None:
    zone_b = Node("node2", labels={"zone": "b", "com.example/disk": "ssd"})
    cases = {
        "node.labels.zone==b": True,
        "node.labels.zone != b": False,
        "node.labels.zone==a": False,
        "node.labels.missing!=x": True,
        "node.labels.com.example/disk==ssd": True,
        "node.name==node2": True,
        "node.name!=node2": False,
        f"node.id=={zone_b.id}": True,
    }
    for text, expected in cases.items():
        assert Constraint.parse(text).matches(zone_b) is expected, text
    assert str(Constraint.parse("node.labels.zone == b")) == "node.labels.zone==b"
    for bad in ("zone==b", "node.labels.zone=b", "node.labels.zone==", "node.role==manager",
                "node.labels.zone==b\n"[:-1] + "\n"):  # fmt: skip
        with pytest.raises(ValidationError, match="invalid constraints"):
            svc(constraints=(bad,))
    with pytest.raises(ValidationError, match="invalid max_replicas_per_node"):
        svc(max_replicas_per_node=-1)


def test_a_node_refuses_bad_labels_availability_and_addresses() -> None:
    with pytest.raises(ValidationError, match="invalid availability"):
        Node("n1", availability="gone")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="invalid address"):
        Node("n1", address="127.0.0.1")
    with pytest.raises(ValidationError, match="invalid address"):
        Node("n1", address="10.0.0.300")
    with pytest.raises(ValidationError, match="invalid labels key"):
        Node("n1", labels={"bad key": "x"})


def test_errors_name_the_field_not_a_flag_and_a_stored_record_is_told_as_one() -> None:
    """The model knows fields, not the CLI's flags (meshctl.cli.flags maps them back)."""
    with pytest.raises(ValidationError) as raised:
        svc(replicas=-1)
    assert raised.value.field == "replicas" and "--" not in str(raised.value)
    with pytest.raises(ValidationError) as raised:
        HealthCheck("http", port=80, path="/ x")
    assert raised.value.field == "health.path"
    stored = {**svc().to_dict(), "replicas": -1}
    record = type("Record", (), {"kind": "service", "name": "web", "value": stored})()
    with pytest.raises(CorruptRecordError) as corrupt:
        from_record(Service, record)
    assert "invalid replicas -1" in str(corrupt.value), corrupt.value
    assert "--replicas" not in str(corrupt.value)


def test_the_cli_says_the_flag_of_the_field() -> None:
    from meshctl.cli.flags import flag_error

    with pytest.raises(ValidationError) as raised:
        svc(replicas=-1)
    assert flag_error(raised.value).startswith("invalid --replicas -1: use a whole number")
    with pytest.raises(ValidationError) as raised:
        HealthCheck("tcp", port=0)
    assert flag_error(raised.value).startswith("invalid --health-tcp port 0:")
    with pytest.raises(ValidationError) as raised:
        Node("n1", labels={"bad key": "x"})
    assert flag_error(raised.value).startswith("invalid --label key 'bad key'")
    assert flag_error(raised.value, ("node", "update")).startswith("invalid --label-add key")
    unnamed = ValidationError("invalid --format '{{': unclosed")  # a flag already: kept
    assert flag_error(unnamed) == str(unnamed)
