#!/bin/sh
# Runs as root inside the booted container: installs uniond's policy files, starts uniond
# on the real system bus, and makes calls as uid 65534 that real polkitd decides.
# SRC (the source tree, bound read-only at its host path) and PY (the tests' python)
# come from /e2e/env.
exec >/out/scenario.log 2>&1
set -x
. /e2e/env
PY="${PY:-$SRC/.venv/bin/python}"
export PYTHONPATH="$SRC:$SRC/tests"
cp "$SRC/dbus/org.uniond1.policy" /usr/share/polkit-1/actions/
cp "$SRC/dbus/org.uniond1.conf" /usr/share/dbus-1/system.d/
mkdir -p /etc/polkit-1/rules.d
cp /e2e/50-uniond-test.rules /etc/polkit-1/rules.d/
busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig
mkdir -p /srv/u/image1 /srv/u/image2 /srv/u/upper /srv/u/merge /srv/u/deny /srv/r/image1 /srv/r/merge
touch /srv/u/image1/a /srv/u/image2/c /srv/r/image1/secret
chown -R 65534:65534 /srv/u
chmod 700 /srv/r/image1
STATE_DIRECTORY=/var/lib/uniond RUNTIME_DIRECTORY=/run/uniond "$PY" -m uniond --bus system >/out/uniond.log 2>&1 &
UNIOND=$!
for i in $(seq 100); do busctl status org.uniond1 >/dev/null 2>&1 && break; sleep 0.1; done
ROOTMOUNT=$(busctl --json=short call org.uniond1 /org/uniond1 org.uniond1.Manager Mount 'asssa{sv}' \
    1 /srv/r/image1 "" "" 0 | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["data"][0])')
sed "s|ROOTMOUNT|$ROOTMOUNT|" /e2e/calls.json > /tmp/calls.json
setpriv --reuid=65534 --regid=65534 --clear-groups "$PY" "$SRC/tests/as_user.py" \
    unix:path=/run/dbus/system_bus_socket < /tmp/calls.json > /out/results.json
MINE=$("$PY" -c 'import json; print(json.load(open("/out/results.json"))[0][1])')
echo "[[\"unmount\", \"$MINE\", {}]]" | setpriv --reuid=65534 --regid=65534 --clear-groups "$PY" \
    "$SRC/tests/as_user.py" unix:path=/run/dbus/system_bus_socket > /out/results2.json
busctl status org.freedesktop.PolicyKit1 > /out/polkit-status 2>&1
kill "$UNIOND"
wait "$UNIOND"
touch /out/t-end
