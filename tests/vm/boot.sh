# The QEMU lane's boot, shared by tests/vm/run (pytest) and bench/vm (any command): installs
# what the host lacks, caches the pinned kernel (tests/vm/kernel.env) and virtme-ng, and boots
# that kernel over the host filesystem with one command inside. Sourced, not run:
#
#   source tests/vm/boot.sh   # from the repository root: sets repo and venv
#   vm_prepare                # installs and caches what is missing; sets kvm and results
#   vm_boot ARGS...           # boots, runs `tests/vm/guest RESULTS VENV ARGS...`, sets wall
#
# Environment:
#   MESHCTL_VENV         the project's venv (default: ./.venv, as scripts/bootstrap makes it)
#   MESHCTL_VM_CACHE     downloaded kernel and virtme-ng (default: /var/cache/meshctl-vm)
#   MESHCTL_VM_RESULTS   where the guest writes its results and logs (default: a new /tmp dir)
#   MESHCTL_VM_KVM       1 or 0 to force KVM on or off (default: on when the CPU offers it)
#   MESHCTL_VM_TIMEOUT   seconds for boot plus the command (default: 2700)
#   MESHCTL_TIME_SCALE   how much slower than a host the tests run in the guest (default: 10
#                        under TCG, 2 with KVM; see tests/vm/guest)
#
# The kernel version is pinned in tests/vm/kernel.env. A second run only boots.
repo=$PWD
# shellcheck source=tests/vm/kernel.env
source tests/vm/kernel.env

venv=${MESHCTL_VENV:-$repo/.venv}
cache=${MESHCTL_VM_CACHE:-/var/cache/meshctl-vm}
timeout_s=${MESHCTL_VM_TIMEOUT:-2700}
# More vng arguments for every boot, set after sourcing; later ones win (the cluster lane,
# tests/vm/cluster/boot: each VM's name, NIC, size).
vm_vng_args=()

vm_prepare() {
  # The host tools: QEMU, busybox for the initramfs that loads the kernel's virtio and 9p
  # modules, depmod, and ipvsadm (the guest runs the host's binaries).
  packages=(qemu-system-x86 busybox-static kmod ipvsadm python3-venv)
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "vm lane: installing ${missing[*]}" >&2
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi

  # virtme-ng in a venv of its own: a lane tool, not a dependency of meshctl.
  vng_venv=$cache/virtme-ng-$VIRTME_NG_VERSION
  if [ ! -x "$vng_venv/bin/vng" ]; then
    echo "vm lane: installing virtme-ng $VIRTME_NG_VERSION into $vng_venv" >&2
    python3 -m venv "$vng_venv"
    "$vng_venv/bin/pip" install -q --disable-pip-version-check "virtme-ng==$VIRTME_NG_VERSION"
  fi

  # The kernel: the .deb is downloaded once into the cache; its image stays there and its
  # modules go to /lib/modules/$KERNEL_ABI (only that version's directory), where the guest,
  # which sees the host's root filesystem, finds them. The guest mounts a tmpfs over
  # /var/cache, so the modules cannot stay in the cache.
  kdir=$cache/linux-image-$KERNEL_ABI-$KERNEL_PACKAGE_VERSION
  vmlinuz=$kdir/boot/vmlinuz-$KERNEL_ABI
  moddir=/lib/modules/$KERNEL_ABI
  stamp=$moddir/.meshctl-vm-$KERNEL_PACKAGE_VERSION
  deb=$kdir/linux-image-${KERNEL_ABI}_${KERNEL_PACKAGE_VERSION}_amd64.deb
  if [ ! -f "$vmlinuz" ] || [ ! -f "$stamp" ]; then
    mkdir -p "$kdir"
    if [ ! -f "$deb" ]; then
      echo "vm lane: downloading linux-image-$KERNEL_ABI $KERNEL_PACKAGE_VERSION" >&2
      # apt downloads as its sandbox user, who cannot write into root's cache directory.
      dl=$(mktemp -d)
      chown _apt "$dl" 2>/dev/null || true
      if ! (cd "$dl" && apt-get download -q "linux-image-$KERNEL_ABI=$KERNEL_PACKAGE_VERSION"); then
        rm -rf "$dl"
        echo "vm lane: Debian no longer serves linux-image-$KERNEL_ABI $KERNEL_PACKAGE_VERSION:" \
          "bump tests/vm/kernel.env (see the comment there)" >&2
        exit 2
      fi
      mv "$dl"/*.deb "$deb"
      rm -rf "$dl"
    fi
    unpacked=$(mktemp -d "$kdir/unpack.XXXXXX")
    dpkg-deb -x "$deb" "$unpacked"
    mkdir -p "$kdir/boot"
    mv "$unpacked/boot/vmlinuz-$KERNEL_ABI" "$vmlinuz"
    rm -rf "$moddir"
    mkdir -p /lib/modules
    mv "$unpacked/lib/modules/$KERNEL_ABI" "$moddir"
    rm -rf "$unpacked"
    depmod -a "$KERNEL_ABI"
    touch "$stamp"
  fi

  # KVM only where the CPU offers virtualisation: an open /dev/kvm alone is not enough (on a VM
  # without nested virtualisation QEMU aborts setting MSRs); TCG is slower but always works.
  kvm=${MESHCTL_VM_KVM:-}
  if [ -z "$kvm" ]; then
    kvm=0
    if [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then kvm=1; fi
  fi
  results=${MESHCTL_VM_RESULTS:-$(mktemp -d /tmp/meshctl-vm-results.XXXXXX)}

  # The guest may not write bytecode to the host's filesystem: compile it here, or every Python
  # process in the VM (pytest, each controller, each `meshctl exec`) compiles meshctl from
  # source again, which takes most of a minute under TCG.
  if [ -x "$venv/bin/python" ]; then
    "$venv/bin/python" -m compileall -q meshctl kernel tests bench >/dev/null
  fi
}

# Boots the kernel and runs `tests/vm/guest RESULTS VENV COMMAND...` in it, its console into
# $results/console.log; sets wall to the seconds it took. vng's own exit status says nothing
# about the command (it returns 255 after a clean run): the verdict is in the files the guest
# writes into $results.
vm_boot() {
  mkdir -p "$results"
  # A result from an earlier run must never stand in for this one.
  rm -f "$results/junit.xml" "$results/exit-code" "$results/pytest.log" \
    "$results/console.log" "$results/output.log"
  local vng_args=(-v -r "$vmlinuz" --memory 2G --cpus 2 --cwd "$repo" --rwdir "$results")
  ((kvm)) || vng_args+=(--disable-kvm)
  # The host's root once more, read-only, for tests/vm/guest to mount with caching: the root
  # virtme-ng mounts caches nothing, so every stat and open in the guest is a round trip.
  vng_args+=("--qemu-opts=-fsdev local,id=meshctl-host,path=/,security_model=none,readonly=on,multidevs=remap -device virtio-9p-pci,fsdev=meshctl-host,mount_tag=meshctl-host")
  vng_args+=("${vm_vng_args[@]}")
  local guest_cmd start
  # The guest sees the host's files, not its environment: it learns KVM or TCG (and a time
  # scale given here) from the command line.
  guest_cmd=$(printf '%q ' env "MESHCTL_VM_KVM=$kvm" \
    ${MESHCTL_TIME_SCALE:+"MESHCTL_TIME_SCALE=$MESHCTL_TIME_SCALE"} \
    "$repo/tests/vm/guest" "$results" "$venv" "$@")
  start=$(date +%s)
  PATH=$vng_venv/bin:$PATH timeout --kill-after=30 "$timeout_s" \
    vng "${vng_args[@]}" -- "$guest_cmd" >"$results/console.log" 2>&1 || true
  wall=$(($(date +%s) - start))
}
