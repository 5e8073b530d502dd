#!/usr/bin/env bash
# Builds dist/stoker_<version>_<arch>.deb: a self-contained virtualenv in /opt/stoker (built
# with Debian's python3, as on the nodes), the systemd unit, a commented default
# configuration in /etc/stoker, a system user `stoker`, the service enabled.
#   packaging/deb/build.sh [OUTDIR]          (or: make deb)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)
python=${PYTHON:-/usr/bin/python3}
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$repo/stoker/__init__.py")
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
venv=$root/opt/stoker

echo "building the virtualenv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check "$repo"
# the venv was built under $stage: point its scripts at where it will live
grep -rlI "^#!$venv/bin/python" "$venv/bin" | xargs sed -i "1s|^#!$venv/|#!/opt/stoker/|"
sed -i "s|$venv|/opt/stoker|g" "$venv/pyvenv.cfg" "$venv"/bin/activate*
find "$venv" -name __pycache__ -prune -exec rm -rf {} +

install -D -m 0644 "$repo/packaging/systemd/stoker.service" "$root/lib/systemd/system/stoker.service"
install -D -m 0640 "$repo/packaging/stoker.toml" "$root/etc/stoker/stoker.toml"
mkdir -p "$root/usr/bin" "$venv/share/doc/stoker"
ln -s /opt/stoker/bin/stoker "$root/usr/bin/stoker"
cp "$repo/README.md" "$repo/docs/"*.md "$repo/alerts/runbook.md" "$venv/share/doc/stoker/"
cp -r "$repo/alerts/stoker.rules.yml" "$repo/dashboards/"*.json "$venv/share/doc/stoker/"

mkdir -p "$root/DEBIAN"
cat > "$root/DEBIAN/control" <<CONTROL
Package: stoker
Version: $version
Architecture: $arch
Maintainer: Stoker developers <stoker@example.org>
Depends: python3 (>= 3.10), passwd
Section: admin
Priority: optional
Homepage: https://github.com/stoker-telemetry/stoker
Description: GPU starvation telemetry agent for training clusters
 Samples NVML (GPM), ConnectX-7 RoCE counters, NFS client statistics and
 NAS probes; exports Prometheus metrics and says when the GPUs are starved,
 and by what.
CONTROL
echo /etc/stoker/stoker.toml > "$root/DEBIAN/conffiles"
install -m 0755 "$repo/packaging/deb/postinst" "$repo/packaging/deb/prerm" "$repo/packaging/deb/postrm" "$root/DEBIAN/"

deb="$out/stoker_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "$deb"
