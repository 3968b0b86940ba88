#!/usr/bin/env bash
# Provisions one node of the cluster of VMs: each Vagrant box (vagrant/Vagrantfile) and each VM
# of the multi-VM QEMU lane (tests/vm/cluster/run), which runs this same script so it cannot rot.
#
#   provision.sh [OPTIONS] NODE NAME=ADDRESS...     as root; one NAME=ADDRESS per node, NODE's too
#
# Installs Debian's packages and meshctl from the synced folder into a venv, names every node
# in /etc/hosts, runs etcd on node1 (the cluster's store, on the private network), writes the
# controller's systemd unit (`--store etcd://node1:2379 --advertise-addr <NODE's address>`),
# starts it and waits until NODE is ready in the store. Running it again converges.
#
# Options (the QEMU lane's VMs boot over the host's filesystem, without systemd):
#   --src DIR            the synced folder, meshctl's source (default: /vagrant)
#   --venv DIR           meshctl's venv (default: /opt/meshctl)
#   --no-install         install nothing: the packages and meshctl in --venv are there already
#   --no-systemd LOGDIR  systemd does not run this machine: start etcd and the controller as
#                        their units would, in the background, their logs in LOGDIR
set -euo pipefail

usage() {
  echo "usage: $0 [--src DIR] [--venv DIR] [--no-install] [--no-systemd LOGDIR] NODE NAME=ADDRESS..." >&2
  exit 2
}

src=/vagrant
venv=/opt/meshctl
install=1
logdir=""
while (($#)); do
  case $1 in
    --src) src=${2:?}; shift 2 ;;
    --venv) venv=${2:?}; shift 2 ;;
    --no-install) install=0; shift ;;
    --no-systemd) logdir=${2:?}; shift 2 ;;
    -*) usage ;;
    *) break ;;
  esac
done
(($# >= 2)) || usage
node=$1
shift

# The cluster's store: etcd on node1, reached by name from every node (the CLI's too).
store_node=node1
store=etcd://$store_node:2379
declare -A hosts=()
for pair in "$@"; do
  [[ $pair == *=* ]] || usage
  hosts[${pair%%=*}]=${pair#*=}
done
address=${hosts[$node]:-}
[ -n "$address" ] || { echo "provision: no address given for $node" >&2; exit 2; }
[ -n "${hosts[$store_node]:-}" ] || { echo "provision: no address given for $store_node" >&2; exit 2; }
say() { echo "provision $node: $*"; }

if ((install)); then
  say "installing packages and meshctl from $src into $venv"
  # What the controller drives (netns, links, netfilter, IPVS, conntrack), curl for the
  # store's health below, and etcd on the store's node.
  packages=(iproute2 iptables kmod procps util-linux conntrack ipvsadm curl python3-venv)
  [ "$node" != "$store_node" ] || packages+=(etcd-server etcd-client)
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check --upgrade "$src"
  ln -sf "$venv/bin/meshctl" /usr/local/bin/meshctl
fi
meshctl=$venv/bin/meshctl
[ -x "$meshctl" ] || { echo "provision: no meshctl in $venv" >&2; exit 1; }

# Every node name resolves to its private address, on every node: drop the lines naming a node
# (Vagrant maps the host's own name to 127.0.1.1, where etcd does not listen) and add ours.
# Written in place: the lane's /etc/hosts is a file mounted over.
names=" ${!hosts[*]} "
{
  awk -v names="$names" '{ for (f = 2; f <= NF; f++) if (index(names, " " $f " ")) next; print }' /etc/hosts
  for name in $(printf '%s\n' "${!hosts[@]}" | sort); do
    echo "${hosts[$name]} $name"
  done
} >/etc/hosts.meshctl
cat /etc/hosts.meshctl >/etc/hosts
rm /etc/hosts.meshctl
# Login shells (`vagrant ssh`, `sudo -i`) use the cluster's store.
echo "export MESHCTL_STORE=$store" >/etc/profile.d/meshctl.sh

# IPVS (the `auto` backend picks it where it loads) and what the data path relies on, now and
# at every boot.
modules=(ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh ip_vs_lc nf_conntrack br_netfilter xt_ipvs)
printf '%s\n' "${modules[@]}" >/etc/modules-load.d/meshctl.conf
for m in "${modules[@]}"; do modprobe "$m"; done

if [ "$node" = "$store_node" ]; then
  say "etcd on $address:2379"
  cat >/etc/default/etcd <<EOF
# Written by meshctl's vagrant/provision.sh: the cluster's store, on the private network.
ETCD_NAME=$node
ETCD_LISTEN_CLIENT_URLS=http://$address:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$address:2379
EOF
  if [ -z "$logdir" ]; then
    systemctl enable etcd
    systemctl restart etcd
  else
    # As etcd.service runs it: its data dir, then /etc/default/etcd.
    (
      set -a
      export ETCD_DATA_DIR=/var/lib/etcd/default
      # shellcheck source=/dev/null
      . /etc/default/etcd
      exec setsid etcd
    ) </dev/null >>"$logdir/etcd.log" 2>&1 &
  fi
fi

# The controller needs the store: wait for it (node1 may still be on its way up).
for ((i = 0; ; i++)); do
  curl -sf --max-time 2 "http://$store_node:2379/health" >/dev/null && break
  if ((i == 300)); then
    echo "provision: the store at $store answers no health check after 10 minutes" >&2
    exit 1
  fi
  sleep 2
done

say "controller of $node, advertising $address"
controller=("$meshctl" --store "$store" controller run --node "$node" --advertise-addr "$address")
unit=/etc/systemd/system/meshctl-controller.service
install -D -m 644 "$src/systemd/meshctl-controller.service" "$unit"
mkdir -p "$unit.d"
cat >"$unit.d/cluster.conf" <<EOF
# Written by meshctl's vagrant/provision.sh: this node in the cluster on node1's etcd.
[Unit]
After=etcd.service
# The store may be away for a while (node1 booting): keep trying.
StartLimitIntervalSec=0

[Service]
ExecStart=
ExecStart=${controller[*]}
EOF
if [ -z "$logdir" ]; then
  systemctl daemon-reload
  systemctl enable meshctl-controller
  systemctl restart meshctl-controller
else
  setsid "${controller[@]}" </dev/null >>"$logdir/controller.log" 2>&1 &
fi

for ((i = 0; ; i++)); do
  shown=$(MESHCTL_STORE=$store "$meshctl" node inspect "$node" --format json 2>/dev/null || true)
  [[ $shown =~ \"state\":\ \"ready\" ]] && break
  if ((i == 150)); then
    echo "provision: $node is not ready after 5 minutes; the controller says:" >&2
    if [ -z "$logdir" ]; then
      journalctl -u meshctl-controller -n 20 >&2
    else
      tail -n 20 "$logdir/controller.log" >&2
    fi
    exit 1
  fi
  sleep 2
done
say "ready"
MESHCTL_STORE=$store "$meshctl" node ls
