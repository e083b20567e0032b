#!/bin/sh
# An arm64 device on any x86_64 host: a Debian bookworm arm64 root with Python 3.11, numpy and onnxruntime
# (optionally openvino), run under qemu user-mode emulation with -L (no binfmt_misc, no chroot). Its
# python.sh is what a device's `python:` names to judge a bundle on ARM kernels (tests/test_devices.py);
# figures from it are an emulator's, never a device's. Run as root; takes about a minute.
#
# Environment:
#   ARM64_DIR      target folder                (default ~/.cache/edgebundle/arm64)
#   HOST_PY        host python with pip         (default python3)
#   ORT_VERSION    onnxruntime version          (default: the host's onnxruntime; "" = newest)
#   WITH_OPENVINO  1 = also add openvino        (default 0)
#   MIRROR         Debian mirror                (default http://deb.debian.org/debian)
set -eu

BASE=${ARM64_DIR:-$HOME/.cache/edgebundle/arm64}
HOST_PY=${HOST_PY:-python3}
ORT_VERSION=${ORT_VERSION-$("$HOST_PY" -c "import importlib.metadata as m; print(m.version('onnxruntime'))" 2>/dev/null || true)}
WITH_OPENVINO=${WITH_OPENVINO:-0}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOT=$BASE/root
SITE=$BASE/site
WHEELS=$BASE/wheels
NICE="nice -n 10"
T0=$(date +%s)

log() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
die() { echo "make.sh: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap creates device nodes)"
case "$BASE" in /*) ;; *) die "ARM64_DIR must be absolute" ;; esac
mkdir -p "$BASE"

# ---------------------------------------------------------------- host tools
need_pkgs=""
command -v debootstrap >/dev/null 2>&1 || need_pkgs="$need_pkgs debootstrap"
command -v qemu-aarch64 >/dev/null 2>&1 || need_pkgs="$need_pkgs qemu-user"
if [ -n "$need_pkgs" ]; then
    log "apt-get install$need_pkgs"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y $need_pkgs >/dev/null 2>&1 || {
        apt-get update >/dev/null && apt-get install -y $need_pkgs >/dev/null; }
fi
command -v "$HOST_PY" >/dev/null 2>&1 || die "HOST_PY=$HOST_PY not found"
"$HOST_PY" -m pip --version >/dev/null 2>&1 || die "no pip in $HOST_PY"

# ---------------------------------------------------------------- step 1: root
log "debootstrap --foreign (download + unpack required packages)"
rm -rf "$ROOT" "$SITE" "$WHEELS"
$NICE debootstrap --arch=arm64 --foreign --variant=minbase \
    --include=python3,python3-minimal,libpython3.11-stdlib,libstdc++6,libgcc-s1,zlib1g \
    bookworm "$ROOT" "$MIRROR" > "$BASE/debootstrap.log" 2>&1 \
    || { tail -20 "$BASE/debootstrap.log"; die "debootstrap failed"; }

# --foreign only unpacks the "required" set; the "base" set (python3 and its
# libraries, from --include) is only downloaded. Unpack it the way debootstrap
# does (no maintainer scripts are needed for python to run).
log "unpacking base packages: $(cat "$ROOT/debootstrap/base")"
for p in $(cat "$ROOT/debootstrap/base"); do
    deb=$(ls "$ROOT"/var/cache/apt/archives/"${p}"_*.deb 2>/dev/null | head -n1)
    [ -n "$deb" ] || die "no .deb for $p"
    dpkg-deb --fsys-tarfile "$deb" | tar --keep-directory-symlink -xf - -C "$ROOT"
done
[ -x "$ROOT/usr/bin/python3.11" ] || die "python3.11 not unpacked"

# slim: downloaded .debs, docs, locales, man pages
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/usr/share/doc \
       "$ROOT"/usr/share/locale "$ROOT"/usr/share/man

# debootstrap made root/proc a symlink to the HOST /proc; make it a real folder
# holding only a fake aarch64 /proc/cpuinfo. qemu -L looks each absolute path up
# in the root first and falls back to the host path per file, so everything
# else under /proc (self/, meminfo, ...) still comes from the host.
# Without this, onnxruntime's bundled cpuinfo library parses the host's x86
# /proc/cpuinfo, finds no ARM cores and segfaults while loading
# onnxruntime_pybind11_state.so.
rm -rf "$ROOT/proc"
mkdir -p "$ROOT/proc"
ncpu=$(getconf _NPROCESSORS_CONF 2>/dev/null || nproc)
i=0
: > "$ROOT/proc/cpuinfo"
while [ "$i" -lt "$ncpu" ]; do
    cat >> "$ROOT/proc/cpuinfo" <<EOF
processor	: $i
BogoMIPS	: 50.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x3
CPU part	: 0xd0c
CPU revision	: 1

EOF
    # MIDR_EL1 (Neoverse-N1 r3p1) for oneDNN/xbyak_aarch64 used by openvino
    mkdir -p "$ROOT/sys/devices/system/cpu/cpu$i/regs/identification"
    echo 0x00000000413fd0c1 > "$ROOT/sys/devices/system/cpu/cpu$i/regs/identification/midr_el1"
    i=$((i + 1))
done

# ---------------------------------------------------------------- step 2: wheels
PLAT=""
for v in 36 35 34 33 32 31 30 29 28 27 26 17; do   # bookworm has glibc 2.36
    PLAT="$PLAT --platform manylinux_2_${v}_aarch64"
done
PLAT="$PLAT --platform manylinux2014_aarch64"
PIPDL="$HOST_PY -m pip download -q --disable-pip-version-check --only-binary=:all: $PLAT --python-version 3.11 --implementation cp --abi cp311 -d $WHEELS"

ort_spec=onnxruntime${ORT_VERSION:+==$ORT_VERSION}
log "pip download $ort_spec numpy (aarch64)"
if ! $NICE $PIPDL "$ort_spec" numpy; then
    echo "WARNING: $ort_spec has no aarch64 wheel; taking the newest onnxruntime" >&2
    $NICE $PIPDL onnxruntime numpy || die "pip download onnxruntime failed"
fi
if [ "$WITH_OPENVINO" = 1 ]; then
    log "pip download openvino (optional)"
    $NICE $PIPDL openvino openvino-telemetry \
        || echo "WARNING: openvino aarch64 wheel download failed (optional)" >&2
fi
ls -1 "$WHEELS"

log "unzipping wheels into $SITE"
mkdir -p "$SITE"
for w in "$WHEELS"/*.whl; do
    "$HOST_PY" -m zipfile -e "$w" "$SITE"
done
# wheels with <name>.data/{purelib,platlib} (none today, but be safe)
for d in "$SITE"/*.data; do
    [ -d "$d" ] || continue
    for sub in purelib platlib; do
        [ -d "$d/$sub" ] && cp -a "$d/$sub/." "$SITE/"
    done
    rm -rf "$d"
done
# put $SITE on the emulated python's sys.path without needing PYTHONPATH
echo "$SITE" > "$ROOT/usr/lib/python3/dist-packages/zz-arm64-site.pth"

# ---------------------------------------------------------------- step 4: wrapper
cat > "$BASE/python.sh" <<'EOF'
#!/bin/sh
# Run the aarch64 (arm64) Debian bookworm Python 3.11 under qemu user-mode
# emulation (no binfmt_misc, no chroot). Arguments are passed through unchanged;
# relative paths resolve against the caller's working directory.
# numpy / onnxruntime / openvino come from $BASE/site, which is put on sys.path by
# root/usr/lib/python3/dist-packages/zz-arm64-site.pth (PYTHONPATH is not needed).
BASE=$(dirname "$(readlink -f "$0")")
unset PYTHONHOME
PYTHONNOUSERSITE=1; export PYTHONNOUSERSITE
# the CPU the root's /proc/cpuinfo describes (Neoverse-N1: asimd, dotprod), so the runtime picks its kernels
QEMU_CPU=${QEMU_CPU:-neoverse-n1}; export QEMU_CPU
exec "${QEMU_AARCH64:-qemu-aarch64}" -L "$BASE/root" "$BASE/root/usr/bin/python3.11" "$@"
EOF
chmod +x "$BASE/python.sh"

# ---------------------------------------------------------------- check
log "check: numpy and onnxruntime import under emulation"
out=$("$BASE/python.sh" -c "import numpy, onnxruntime, platform; print(platform.machine(), onnxruntime.__version__)") \
    || die "emulated 'import numpy, onnxruntime' failed"
echo "$out"
case "$out" in aarch64\ *) ;; *) die "unexpected output: $out" ;; esac
du -sh "$ROOT" "$SITE"
log "OK: $BASE/python.sh"
