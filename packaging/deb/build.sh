#!/usr/bin/env bash
# Builds dist/stoker_<version>_<arch>.deb: a self-contained virtualenv in /opt/stoker, the systemd
# unit, a commented default configuration in /etc/stoker, the manual page, a system user `stoker`
# and a group `stoker-hints` (postinst), the service enabled.
#   packaging/deb/build.sh [OUTDIR]          (or: make deb; lintian: make lintian)
#
# The virtualenv's compiled modules are for the build host's Python (cpython-311 on Debian 12), so
# the package depends on exactly that interpreter package (python3.11), not on "python3": build it
# on the release you deploy to. Needs dpkg-dev (dpkg-shlibdeps) and binutils (strip); scripts/setup.sh
# installs them.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)
python=${PYTHON:-/usr/bin/python3}
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$repo/stoker/__init__.py")
arch=$(dpkg --print-architecture)
for tool in dpkg-shlibdeps strip; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
changelog_version=$(sed -n '1s/^stoker (\([^)]*\)).*/\1/p' "$repo/packaging/deb/changelog")
if [ "$changelog_version" != "$version" ]; then
  echo "build.sh: stoker/__init__.py says $version, packaging/deb/changelog's top entry $changelog_version:" \
       "add an entry for $version" >&2
  exit 1
fi

# The exact interpreter, e.g. /usr/bin/python3.11 from the package python3.11: the venv links to it,
# not to /usr/bin/python3, which a distribution upgrade moves to another minor version.
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
interpreter=/usr/bin/python$pyver
pypackage=python$pyver
[ -x "$interpreter" ] && dpkg-query -W -f='${Status}' "$pypackage" 2>/dev/null | grep -q "ok installed" || {
  echo "build.sh: build with a Debian-packaged Python: $interpreter from the package $pypackage" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/debian/stoker  # where dpkg-shlibdeps expects the package's files
venv=$root/opt/stoker
site=$venv/lib/python$pyver/site-packages

echo "building the virtualenv for $interpreter" >&2
"$interpreter" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check "$repo" >&2
# What only installs things goes: pip and setuptools, the activation scripts and every other
# distribution's command-line tools (pyroute2's ss2, pyroute2-cli, ...); stoker and python remain.
"$venv/bin/python" -m pip uninstall --quiet --yes pip setuptools >&2
find "$venv/bin" -mindepth 1 ! -name stoker ! -name 'python*' -exec rm -rf {} +
rm -rf "$venv/include"  # for headers of extensions built in the venv: none is, it stays empty
# PyYAML's wheel embeds its own libyaml in _yaml*.so; without it PyYAML is pure Python (the web
# configuration is a few lines of YAML, read at start and reload).
rm -f "$site"/yaml/_yaml*.so
# Compiled modules: stripped as dh_strip does.
find "$venv" -name '*.so' -type f -exec strip --remove-section=.comment --remove-section=.note \
  --strip-unneeded {} +
# A "#!" line in a module that is not executable means nothing; blanked, so line numbers keep.
find "$site" -name '*.py' -type f ! -perm /111 -exec grep -lI -m1 '^#!' {} + 2>/dev/null |
  xargs -r sed -i '1s/^#!.*$//'
# the venv was built under $stage: point its script and configuration at where it will live
sed -i "1s|^#!$venv/|#!/opt/stoker/|" "$venv/bin/stoker"
sed -i "s|$venv|/opt/stoker|g" "$venv/pyvenv.cfg"
find "$venv" -name __pycache__ -prune -exec rm -rf {} +
if grep -rlI --exclude-dir=__pycache__ "$stage" "$venv"; then
  echo "build.sh: files above still name the build directory" >&2; exit 1
fi

install -D -m 0644 "$repo/packaging/systemd/stoker.service" "$root/lib/systemd/system/stoker.service"
install -D -m 0640 "$repo/packaging/stoker.toml" "$root/etc/stoker/stoker.toml"
mkdir -p "$root/usr/bin" "$venv/share/doc/stoker"
ln -s /opt/stoker/bin/stoker "$root/usr/bin/stoker"
cp "$repo/README.md" "$repo/docs/"*.md "$repo/alerts/runbook.md" "$venv/share/doc/stoker/"
cp "$repo/alerts/stoker.rules.yml" "$venv/share/doc/stoker/"
# For the Grafana host, laid out as it needs them (docs/OPERATIONS.md, "Dashboards"): the provisioning
# files (data source, dashboard provider) and the dashboards the provider loads.
mkdir -p "$venv/share/doc/stoker/grafana/dashboards"
cp -r "$repo/packaging/grafana/provisioning" "$venv/share/doc/stoker/grafana/"
cp "$repo/dashboards/"*.json "$venv/share/doc/stoker/grafana/dashboards/"

# Debian's own places: manual page (from the argparse definitions), copyright, changelog, overrides.
doc=$root/usr/share/doc/stoker
install -d "$root/usr/share/man/man1" "$doc" "$root/usr/share/lintian/overrides"
"$venv/bin/python" -m stoker.manpage | gzip -9n > "$root/usr/share/man/man1/stoker.1.gz"
"$venv/bin/python" "$repo/packaging/deb/copyright.py" "$venv" /opt/stoker > "$doc/copyright"
gzip -9n < "$repo/packaging/deb/changelog" > "$doc/changelog.gz"
install -m 0644 "$repo/packaging/deb/lintian-overrides" "$root/usr/share/lintian/overrides/stoker"
find "$venv" -name __pycache__ -prune -exec rm -rf {} +
chmod 0644 "$doc/copyright" "$doc/changelog.gz" "$root/usr/share/man/man1/stoker.1.gz"

# Shared-library dependencies of the compiled modules (libc6, libgcc-s1, libstdc++6), as
# dh_shlibdeps computes them; dpkg-shlibdeps wants the debian/control of a source package.
mkdir -p "$root/DEBIAN"  # how dpkg-shlibdeps finds the package's root
printf 'Source: stoker\n\nPackage: stoker\nArchitecture: any\n' > "$stage/debian/control"
mapfile -t objects < <(cd "$stage" && find debian/stoker -name '*.so' -type f)
shlibs=$(cd "$stage" && dpkg-shlibdeps --warnings=0 -O "${objects[@]}" | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { echo "build.sh: dpkg-shlibdeps found no shared-library dependency" >&2; exit 1; }

cat > "$root/DEBIAN/control" <<CONTROL
Package: stoker
Version: $version
Architecture: $arch
Maintainer: Stoker developers <stoker@example.org>
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: $pypackage, passwd, ${shlibs}
Section: admin
Priority: optional
Homepage: https://github.com/stoker-telemetry/stoker
Description: GPU starvation telemetry agent for training clusters
 Samples NVML (GPM), ConnectX-7 RoCE counters, NFS client statistics and
 NAS probes; exports Prometheus metrics and says when the GPUs are starved,
 and by what. A self-contained virtualenv in /opt/stoker for $pypackage.
CONTROL
echo /etc/stoker/stoker.toml > "$root/DEBIAN/conffiles"
install -m 0755 "$repo/packaging/deb/postinst" "$repo/packaging/deb/prerm" "$repo/packaging/deb/postrm" "$root/DEBIAN/"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) \
  > "$root/DEBIAN/md5sums"

deb="$out/stoker_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "$deb"
