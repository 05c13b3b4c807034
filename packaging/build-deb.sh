#!/usr/bin/env bash
# Build edge-agent_<version>_amd64.deb (`make deb`).  A hand-laid binary package built
# with dpkg-deb: see packaging/README.md for the layout and why not debhelper.
#
#   DEB_VERSION  package version (default: the version in pyproject.toml)
#   DEB_OUT      folder for the .deb (default: build/)
#   DEB_LINT     0 skips lintian (default: lintian --fail-on error on the result)
#
# Needs Debian's python3.11 + python3.11-venv, dpkg-dev tools, and the package index
# (PyPI) at build time only: every runtime wheel is pinned by sha256 in
# packaging/requirements.lock.  Nothing is downloaded when the package is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

PY=/usr/bin/python3.11
DEST=/opt/edge-agent/.venv
arch=$(dpkg --print-architecture)
if [ "$arch" != amd64 ]; then
  echo "build-deb: the lock pins x86_64 wheels; this machine is $arch" >&2
  exit 1
fi
[ -x "$PY" ] || { echo "build-deb: $PY missing (apt-get install python3.11-venv)" >&2; exit 1; }
version=${DEB_VERSION:-$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')}
out=${DEB_OUT:-build}
work=$repo/build/deb
root=$work/root
venv=$root$DEST
export PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# Reproducible timestamps: the commit time (dpkg-deb clamps file mtimes to it).
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH

rm -rf "$root" "$work/dist"
mkdir -p "$root/DEBIAN" "$work/dist" "$out"
log=$work/build.log
: > "$log"
step() { echo "== [${SECONDS}s] $*"; }
run() { "$@" >> "$log" 2>&1 || { tail -30 "$log"; echo "build-deb: failed: $*" >&2; exit 1; }; }

step "venv at $DEST (staged in $root)"
run "$PY" -m venv "$venv"
step "runtime wheels from packaging/requirements.lock (--require-hashes)"
run "$venv/bin/python" -m pip install --no-compile --no-deps --require-hashes \
    --only-binary :all: -r packaging/requirements.lock
step "edge-agent wheel"
run "$venv/bin/python" -m pip wheel --no-deps -w "$work/dist" .
run "$venv/bin/python" -m pip install --no-compile --no-deps --no-index "$work"/dist/edge_agent-*.whl
# The package runs the app, it does not install into the venv: no pip, no setuptools.
run "$venv/bin/python" -m pip uninstall -y pip setuptools
find "$venv" -depth -type d -name __pycache__ -exec rm -rf {} +
rm -f "$venv"/bin/activate* "$venv"/bin/Activate.ps1
rmdir "$venv/include/python3.11" "$venv/include"  # no C headers: nothing is compiled here
"$PY" tools/debpkg.py relocate "$root" "$DEST"

step "config, systemd units, docs"
install -d -m 755 "$root/etc/edge-agent" "$root/lib/systemd/system" "$root/usr/lib/sysusers.d" \
  "$root/usr/lib/tmpfiles.d" "$root/usr/bin" "$root/usr/share/doc/edge-agent/examples" \
  "$root/usr/share/lintian/overrides" "$root/usr/share/man/man1"
"$venv/bin/python" tools/debpkg.py conffile "$root/etc/edge-agent/agent.toml"
install -m 644 systemd/edge-agent.service "$root/lib/systemd/system/"
install -m 644 systemd/sysusers.d/edge-agent.conf "$root/usr/lib/sysusers.d/"
install -m 644 systemd/tmpfiles.d/edge-agent.conf "$root/usr/lib/tmpfiles.d/"
install -m 644 systemd/edge-agent.service.d/*.example "$root/usr/share/doc/edge-agent/examples/"
ln -s "$DEST/bin/edge-agent" "$root/usr/bin/edge-agent"
gzip -9n < packaging/debian/edge-agent.1 > "$root/usr/share/man/man1/edge-agent.1.gz"
install -m 644 packaging/debian/lintian-overrides "$root/usr/share/lintian/overrides/edge-agent"
cp packaging/debian/copyright.in "$root/usr/share/doc/edge-agent/copyright"
"$PY" tools/debpkg.py copyright "$venv" "$root/usr/share/doc/edge-agent/copyright"
changelog=$work/changelog
top=$(sed -n '1s/^edge-agent (\([^)]*\)).*/\1/p' packaging/debian/changelog)
if [ "$top" != "$version" ]; then  # a local build with DEB_VERSION: say so in its changelog
  printf 'edge-agent (%s) unstable; urgency=medium\n\n  * Local build of %s.\n\n -- %s  %s\n\n' \
    "$version" "$(git describe --always --dirty 2>/dev/null || echo unknown)" \
    "edge-agent maintainers <edge-agent@example.org>" "$(date -R -u -d "@$SOURCE_DATE_EPOCH")" > "$changelog"
  cat packaging/debian/changelog >> "$changelog"
else
  cp packaging/debian/changelog "$changelog"
fi
gzip -9n < "$changelog" > "$root/usr/share/doc/edge-agent/changelog.gz"

step "permissions"
chmod -R u+rwX,go+rX,go-w "$root"
# Shared objects are mapped, not executed.
find "$root" -type f -name '*.so*' -exec chmod 644 {} +
# Nothing under lib/ is executed directly (modules, metadata, shared objects),
# whatever mode the wheel gave it.
find "$venv/lib" -type f -exec chmod 644 {} +

step "control"
for f in conffiles postinst prerm postrm; do
  install -m "$([ $f = conffiles ] && echo 644 || echo 755)" "packaging/debian/$f" "$root/DEBIAN/$f"
done
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
depends="python3.11, systemd, $("$PY" tools/debpkg.py shlibs "$venv")"
sed -e "s/@VERSION@/$version/" -e "s/@INSTALLED_SIZE@/$size/" -e "s/@DEPENDS@/$depends/" \
  packaging/debian/control.in > "$root/DEBIAN/control"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
  | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
chmod 644 "$root/DEBIAN/md5sums"

deb=$out/edge-agent_${version}_${arch}.deb
step "dpkg-deb --build -> $deb"
# xz level 1: 52 MB in ~15 s here; the default level 6 saves 7 MB for minutes of CPU.
run dpkg-deb --root-owner-group -Zxz -z1 --threads-max=2 --build "$root" "$deb"
if [ "${DEB_LINT:-1}" != 0 ]; then
  # Overrides (packaging/debian/lintian-overrides) cover only what a vendored venv
  # cannot avoid; any other error fails the build.
  step "lintian"
  lintian --fail-on error "$deb"
fi
echo "built $deb"
