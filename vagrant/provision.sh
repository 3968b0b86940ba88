#!/usr/bin/env bash
# Provisions one node of the cluster of VMs: each Vagrant box (vagrant/Vagrantfile) and each VM
# of the multi-VM QEMU lane (tests/vm/cluster/run), which runs this same script so it cannot rot.
#
#   provision.sh [OPTIONS] NODE NAME=ADDRESS...     as root; one NAME=ADDRESS per node, NODE's too
#
# Installs Debian's packages and meshctl from the synced folder into a venv, names every node
# in /etc/hosts, and puts NODE in the cluster as a user would (README, "A cluster of nodes"):
# the first NAME=ADDRESS founds it (`meshctl cluster init`: its CA, its etcd member over mutual
# TLS with a login per node), every other node joins it (`meshctl cluster join`) with the token
# in --token-file, as a manager or a worker, whichever the token says. Then it writes the
# controller's systemd unit (`meshctl controller run`: the state directory remembers the
# cluster; on a manager the controller also runs the node's etcd member), starts it and waits
# until NODE is ready. Running it again converges: a node in the cluster already stays in it.
#
# Options (the QEMU lane's VMs boot over the host's filesystem, without systemd):
#   --src DIR            the synced folder, meshctl's source (default: /vagrant)
#   --venv DIR           meshctl's venv (default: /opt/meshctl)
#   --token-file FILE    every node but the first: its join token, which whoever holds the
#                        first node's tokens writes there (the Vagrantfile, the lane); waited for
#   --controller-option OPTION   one more `controller run` option (repeatable), in the unit too
#   --no-install         install nothing: the packages and meshctl in --venv are there already
#   --no-systemd LOGDIR  systemd does not run this machine: start the controller as its unit
#                        would, in the background, its log in LOGDIR
set -euo pipefail

usage() {
  echo "usage: $0 [--src DIR] [--venv DIR] [--token-file FILE] [--controller-option OPTION]..." \
    "[--no-install] [--no-systemd LOGDIR] NODE NAME=ADDRESS..." >&2
  exit 2
}

src=/vagrant
venv=/opt/meshctl
token_file=""
controller_options=()
install=1
logdir=""
while (($#)); do
  case $1 in
    --src) src=${2:?}; shift 2 ;;
    --venv) venv=${2:?}; shift 2 ;;
    --token-file) token_file=${2:?}; shift 2 ;;
    --controller-option) controller_options+=("${2:?}"); shift 2 ;;
    --no-install) install=0; shift ;;
    --no-systemd) logdir=${2:?}; shift 2 ;;
    -*) usage ;;
    *) break ;;
  esac
done
(($# >= 2)) || usage
node=$1
shift

# The first node founds the cluster; the others join it through its address.
first=${1%%=*}
declare -A hosts=()
for pair in "$@"; do
  [[ $pair == *=* ]] || usage
  hosts[${pair%%=*}]=${pair#*=}
done
address=${hosts[$node]:-}
[ -n "$address" ] || { echo "provision: no address given for $node" >&2; exit 2; }
if [ "$node" != "$first" ] && [ -z "$token_file" ]; then
  echo "provision: $node joins the cluster of $first: give its join token (--token-file)" >&2
  exit 2
fi
say() { echo "provision $node: $*"; }

if ((install)); then
  say "installing packages and meshctl from $src into $venv"
  # What the controller drives (netns, links, netfilter, IPVS, conntrack), and etcd, which a
  # manager's controller runs as the node's member of the store (a token may make any node one).
  packages=(iproute2 iptables kmod procps util-linux conntrack ipvsadm etcd-server python3-venv)
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"
  # Debian starts an etcd of its own on install (plain HTTP on loopback): meshctl runs the
  # member, on the same client port.
  [ -n "$logdir" ] || systemctl disable --now etcd
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
# No store to name any more (the state directory remembers the cluster): drop the plain etcd
# an earlier provisioning pointed login shells to.
rm -f /etc/profile.d/meshctl.sh

# IPVS (the `auto` backend picks it where it loads) and what the data path relies on, now and
# at every boot.
modules=(ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh ip_vs_lc nf_conntrack br_netfilter xt_ipvs)
printf '%s\n' "${modules[@]}" >/etc/modules-load.d/meshctl.conf
for m in "${modules[@]}"; do modprobe "$m"; done

# Into the cluster, once: the state directory remembers it (and the controller finds its node
# name and address there).
state_dir=${MESHCTL_STATE_DIR:-/var/lib/meshctl}
if [ -f "$state_dir/cluster/cluster.json" ]; then
  say "in the cluster already ($state_dir/cluster)"
elif [ "$node" = "$first" ]; then
  say "founding the cluster, advertising $address"
  "$meshctl" cluster init --advertise-addr "$address" --node "$node"
else
  # The token comes once the first node is ready (the lane writes it then); a Vagrant box
  # finds it in the synced folder.
  for ((i = 0; ; i++)); do
    [ -s "$token_file" ] && break
    if ((i == 300)); then
      echo "provision: no join token in $token_file after 10 minutes" >&2
      exit 1
    fi
    sleep 2
  done
  say "joining the cluster through $first (${hosts[$first]}), advertising $address"
  "$meshctl" cluster join --token "$(<"$token_file")" --advertise-addr "$address" \
    --node "$node" "${hosts[$first]}"
fi

say "controller of $node"
controller=("$meshctl" controller run "${controller_options[@]}")
unit=/etc/systemd/system/meshctl-controller.service
install -D -m 644 "$src/systemd/meshctl-controller.service" "$unit"
mkdir -p "$unit.d"
cat >"$unit.d/cluster.conf" <<EOF
# Written by meshctl's vagrant/provision.sh: this node in the cluster it joined.
[Unit]
# The store may be away for a while (the other managers booting): keep trying.
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
  # As the unit would (Restart=on-failure, RestartSec=2, no start limit): a controller that
  # cannot reach the store yet exits, and is started again.
  # shellcheck disable=SC2016 # expanded by the inner shell
  setsid bash -c 'until "$@"; do sleep 2; done' controller "${controller[@]}" \
    </dev/null >>"$logdir/controller.log" 2>&1 &
fi

# Ready: first its controller says so (one process asking it over loopback: a CLI start every
# few seconds would cost a slow machine much of its CPU), then the store.
"$meshctl" controller health --ready --wait 300s >/dev/null || true
for ((i = 0; ; i++)); do
  shown=$("$meshctl" node inspect "$node" --format json 2>/dev/null || true)
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
"$meshctl" node ls
