#!/usr/bin/env bash
# Build pyfuse3 3.5.0 with lseek.patch, read-segments.patch and read-maps.patch and install it
# into a Python environment.
#
#   bash contrib/pyfuse3/install.sh [PYTHON]          (default: python3)
#   bash contrib/pyfuse3/install.sh --check [PYTHON]  exit 0 if PYTHON already has it
#   bash contrib/pyfuse3/install.sh --verbose [PYTHON] pip's output on stdout as it goes
#                                                      (scripts/setup shows its progress)
#
# The sdist comes from PyPI (only pyfuse3 as source: its build tools, Cython
# included, come as wheels) and is checked against a pinned SHA-256 before it is
# unpacked. Needs what any pyfuse3 build needs (libfuse3-dev, pkg-config, a C
# compiler, the Python headers; pip fetches Cython into the build environment)
# plus patch(1). The result reports version 3.5.0+vmafs.lseek1.segments2.maps1, which
# satisfies vmafs's "pyfuse3>=3.3", so a later `pip install vmafs` keeps it.
#
# Exit status: 0 when the installed pyfuse3 has Operations.lseek,
# pyfuse3.READ_SEGMENTS and pyfuse3.READ_MAPS, non-zero otherwise (with pip's last lines on stderr).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECK=0 VERBOSE=0
case "${1:-}" in
--check) CHECK=1 && shift ;;
--verbose) VERBOSE=1 && shift ;;
esac
PY=${1:-python3}
VERSION=3.5.0
SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
# Raise a number with every change to its patch, so --check asks for a rebuild.
LOCAL_VERSION="$VERSION+vmafs.lseek1.segments2.maps1"
PATCHES=(lseek.patch read-segments.patch read-maps.patch) # in this order

installed() { # true if PY has this build of pyfuse3 and it has all three additions
    "$PY" - "$LOCAL_VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version

import pyfuse3

sys.exit(
    version("pyfuse3") != sys.argv[1]
    or not hasattr(pyfuse3.Operations, "lseek")
    or not getattr(pyfuse3, "READ_SEGMENTS", False)
    or not getattr(pyfuse3, "READ_MAPS", False)
)
PYEOF
}

if ((CHECK)); then
    installed
    exit
fi

die() {
    echo "pyfuse3-vmafs: error: $*" >&2
    exit 1
}

command -v patch >/dev/null || die "patch(1) is not installed (Debian package patch)"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pyfuse3-vmafs.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# logged CMD...: CMD's output into $WORK/pip.log (and on stdout with --verbose).
logged() {
    if ((VERBOSE)); then
        "$@" 2>&1 | tee -a "$WORK/pip.log"
    else
        "$@" >>"$WORK/pip.log" 2>&1
    fi
}

logged "$PY" -m pip download --no-deps --no-binary pyfuse3 -d "$WORK" "pyfuse3==$VERSION" ||
    { tail -n 20 "$WORK/pip.log" >&2; die "could not download the pyfuse3 $VERSION sdist"; }
SDIST="$WORK/pyfuse3-$VERSION.tar.gz"
[[ -f "$SDIST" ]] || die "pip did not leave $SDIST"
echo "$SHA256  $SDIST" | sha256sum --check --quiet - ||
    die "$SDIST does not have the pinned SHA-256 $SHA256"

tar -xzf "$SDIST" -C "$WORK"
for p in "${PATCHES[@]}"; do
    patch --quiet -p1 -d "$WORK/pyfuse3-$VERSION" <"$HERE/$p" ||
        die "$p does not apply to pyfuse3 $VERSION"
done

# setuptools_scm would take the version from PKG-INFO; mark the build as patched.
: >"$WORK/pip.log"
SETUPTOOLS_SCM_PRETEND_VERSION="$LOCAL_VERSION" \
    logged "$PY" -m pip install --progress-bar off -v "$WORK/pyfuse3-$VERSION" ||
    { tail -n 40 "$WORK/pip.log" >&2; die "building pyfuse3 $LOCAL_VERSION failed"; }

installed || die "pyfuse3 $LOCAL_VERSION was installed but does not import with Operations.lseek, READ_SEGMENTS and READ_MAPS"
echo "pyfuse3-vmafs: installed pyfuse3 $LOCAL_VERSION into $("$PY" -c 'import sys; print(sys.prefix)')"
