#!/bin/bash
# The end-to-end scenario, run inside a container booted with real systemd (see
# tests/test_systemd_e2e.py): install the .deb, then drive uniond.service the way an
# administrator would, with systemctl and busctl. Every result goes to /out; pytest
# asserts on it from the host. Steps are marked in the journal ("STEP <name>", tag
# e2e) so that the host can tell which journal lines belong to which step.
#
# No `set -e`: a failed step must not hide the results of the later ones.
set -u
OUT=/out
S=/srv/e2e
exec >"$OUT/scenario.log" 2>&1
set -x

step() { echo "STEP $1" | systemd-cat -t e2e; }
show() { systemctl show -p ActiveState,SubState,StatusText,MainPID,NRestarts,Result uniond.service | paste -sd'|'; }
call() { busctl --json=short call org.uniond1 /org/uniond1 org.uniond1.Manager "$@"; }
objpath() { python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0])' < "$1"; }
prop() { busctl get-property org.uniond1 "$1" org.uniond1.Mount "$2" | sed 's/^s "\(.*\)"$/\1/'; }
wait_for() {  # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
  local end=$(( $(date +%s%N) + $1 * 1000000000 )); shift
  until "$@"; do [ "$(date +%s%N)" -lt "$end" ] || return 1; sleep 0.05; done
}
is_active() { [ "$(systemctl show -P ActiveState uniond.service)" = active ]; }
restarted() { [ "$(systemctl show -P NRestarts uniond.service)" -gt "$1" ] && is_active; }
now() { date +%s.%N; }
mount_at() {  # the mount object whose Mountpoint is $1
  for p in $(busctl call org.uniond1 /org/uniond1 org.uniond1.Manager ListMounts | cut -d' ' -f3- | tr -d '"'); do
    [ "$(prop "$p" Mountpoint)" = "$1" ] && echo "$p"
  done
}

date +%s.%N > "$OUT/t-begin"
# PID 1 logs each sd_notify message it gets at debug level: the journal then shows
# READY=1, RELOADING=1, STOPPING=1 as systemd received them.
systemd-analyze log-level debug

step install
# The host image forbids starting services (policy-rc.d exits 101, as in Docker images);
# on a booted system the package must start its service, so drop it (in the throw-away
# /usr layer only).
rm -f /usr/sbin/policy-rc.d
# Offline (the container has no network): the dependencies are already installed.
apt-get install -y --no-install-recommends /deb/uniond_*.deb > "$OUT/install.log" 2>&1
echo $? > "$OUT/install.rc"
command -v uniond > "$OUT/which-uniond"
systemctl is-enabled uniond.service > "$OUT/enabled"
show > "$OUT/after-install"
stat -c '%a %U' /var/lib/uniond /run/uniond > "$OUT/dirs"
busctl list --activatable --no-legend | awk '{print $1}' > "$OUT/activatable"
pkaction --verbose --action-id org.uniond1.mount > "$OUT/pkaction" 2>&1
systemd-analyze security --no-pager uniond.service > "$OUT/security" 2>&1
systemd-analyze verify uniond.service > "$OUT/verify" 2>&1; echo $? > "$OUT/verify.rc"

step start
systemctl stop uniond.service
systemctl start --no-block uniond.service
# Sample what systemd sees until it says active: activating (start) first, then active.
for _ in $(seq 400); do
  s=$(show); echo "$s" >> "$OUT/start-samples"
  case "$s" in *ActiveState=active*) break ;; esac
done
systemctl show -p Type,ExecMainStartTimestampMonotonic,ActiveEnterTimestampMonotonic uniond.service > "$OUT/start-times"

step mount
mkdir -p $S/l1 $S/l2 $S/upper $S/merge
echo one > $S/l1/a; echo two > $S/l1/b; echo three > $S/l2/c
call Mount 'asssa{sv}' 2 $S/l2 $S/l1 $S/upper $S/merge 1 description s e2e > "$OUT/mount.json"
A=$(objpath "$OUT/mount.json"); echo "$A" > "$OUT/mount-a"
# Seen outside the service: from this unit, from PID 1's namespace, from another unit.
findmnt -n -o FSTYPE $S/merge > "$OUT/visible-here"
grep -c " $S/merge " /proc/1/mountinfo > "$OUT/visible-pid1"
systemd-run --wait --pipe --quiet cat $S/merge/a $S/merge/c > "$OUT/visible-unit" 2>&1
rm $S/merge/a; echo new > $S/merge/d
call Diff 'oa{sv}' "$A" 0 > "$OUT/diff.json"
# The packaged unionctl (Debian's python3-click and python3-tqdm) on the same mount.
unionctl status --json > "$OUT/unionctl-status.json" 2>&1
unionctl diff --json $S/merge/d > "$OUT/unionctl-diff.json" 2>&1

step busy
# A process of another user holds the mount: uniond names it (reading another user's
# /proc/PID/cwd, root and fd/ is what CAP_SYS_PTRACE is kept for).
systemd-run --unit=e2e-holder -p User=nobody -p WorkingDirectory=$S/merge sleep 60
holding() {  # the holder runs sleep, in the mount
  local pid; pid=$(systemctl show -P MainPID e2e-holder)
  [ "$pid" != 0 ] && [ "$(cat /proc/"$pid"/comm)" = sleep ] && [ "$(readlink /proc/"$pid"/cwd)" = $S/merge ]
}
wait_for 5 holding
systemctl show -P MainPID e2e-holder > "$OUT/holder-pid"
busctl call org.uniond1 /org/uniond1 org.uniond1.Manager Unmount 'oa{sv}' "$A" 0 2> "$OUT/busy"
systemctl stop e2e-holder

step reload-warning
printf 'log_level = "warning"\n' > /etc/uniond/uniond.conf
systemctl reload uniond.service; echo $? > "$OUT/reload-warning.rc"
show > "$OUT/after-reload-warning"
mkdir -p $S/bl $S/bu $S/bm
call Mount 'asssa{sv}' 1 $S/bl $S/bu $S/bm 0 > "$OUT/mount-b.json"
B=$(objpath "$OUT/mount-b.json"); echo "$B" > "$OUT/mount-b"
prop "$B" WorkDir > "$OUT/workdir-b"

step reload-bad
printf 'log_level = "loud"\n' > /etc/uniond/uniond.conf
systemctl reload uniond.service; echo $? > "$OUT/reload-bad.rc"
show > "$OUT/after-reload-bad"

step reload-info
printf 'log_level = "info"\n' > /etc/uniond/uniond.conf
systemctl reload uniond.service; echo $? > "$OUT/reload-info.rc"
show > "$OUT/after-reload-info"

step declared
# A declared mount: a file in /etc/uniond/mounts.d, applied by `systemctl reload`.
mkdir -p $S/dl $S/dm
echo d > $S/dl/d
printf 'lowerdirs = ["%s"]\nmountpoint = "%s"\n' $S/dl $S/dm > /etc/uniond/mounts.d/e2e.toml
uniond --check > "$OUT/check.out" 2>&1; echo $? > "$OUT/check.rc"
systemctl reload uniond.service; echo $? > "$OUT/reload-declared.rc"
cat $S/dm/d > "$OUT/declared-content"
mount_at $S/dm > "$OUT/mount-d"
prop "$(cat "$OUT/mount-d")" Name > "$OUT/declared-name"
rm /etc/uniond/mounts.d/e2e.toml
systemctl reload uniond.service
findmnt -n $S/dm > /dev/null; echo $? > "$OUT/declared-after-removal.rc"

step gone-behind-back
mkdir -p $S/cl $S/cu $S/cm
C=$(call Mount 'asssa{sv}' 1 $S/cl $S/cu $S/cm 0 | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0])')
echo "$C" > "$OUT/mount-c"
umount $S/cm
call Unmount 'oa{sv}' "$C" 0 > "$OUT/unmount-c.json" 2> "$OUT/unmount-c.err"; echo $? > "$OUT/unmount-c.rc"

step bound-unit
# A service asks for its mount from ExecStartPre= with bind=unit: the mount goes when
# the service stops. A second mount is bound by name (unit:NAME) to another service.
mkdir -p $S/ul $S/um $S/vm
echo u > $S/ul/u
printf '[Service]\nExecStartPre=/usr/bin/busctl call org.uniond1 /org/uniond1 org.uniond1.Manager Mount asssa{sv} 1 %s "" %s 1 bind s unit\nExecStart=/bin/sleep infinity\n' \
  $S/ul $S/um > /etc/systemd/system/e2e-bound.service
systemctl daemon-reload
systemctl start e2e-bound.service; echo $? > "$OUT/bound-start.rc"
systemd-run --unit=e2e-named sleep 600
call Mount 'asssa{sv}' 1 $S/ul "" $S/vm 1 bind s unit:e2e-named.service > "$OUT/mount-v.json"
objpath "$OUT/mount-v.json" > "$OUT/mount-v"
mount_at $S/um > "$OUT/mount-u"
cat $S/um/u > "$OUT/bound-while-running"
prop "$(cat "$OUT/mount-u")" BoundTo > "$OUT/bound-to-u"
prop "$(cat "$OUT/mount-v")" BoundTo > "$OUT/bound-to-v"
unmounted() { ! findmnt -n "$1" > /dev/null; }
systemctl stop e2e-bound.service
wait_for 10 unmounted $S/um; echo $? > "$OUT/bound-u-gone.rc"
findmnt -n $S/vm > /dev/null; echo $? > "$OUT/bound-v-while-named-runs.rc"
systemctl stop e2e-named.service
wait_for 10 unmounted $S/vm; echo $? > "$OUT/bound-v-gone.rc"
call ListMounts > "$OUT/list-after-bound.json"

step kill
# B is unmounted behind uniond's back, then uniond is killed: the restarted daemon
# adopts A (still mounted) and cleans B's workdir (its mount is gone).
umount $S/bm
n=$(systemctl show -P NRestarts uniond.service)
pid=$(systemctl show -P MainPID uniond.service)
systemctl kill -s KILL uniond.service
wait_for 15 restarted "$n"; echo $? > "$OUT/kill-restarted.rc"
echo "$pid $(systemctl show -P MainPID uniond.service)" > "$OUT/kill-pids"
show > "$OUT/after-kill"
call ListMounts > "$OUT/list-after-kill.json"
if [ -e "$(cat "$OUT/workdir-b")" ]; then echo present; else echo absent; fi > "$OUT/workdir-b-after-kill"
findmnt -n -o FSTYPE $S/merge > "$OUT/a-after-kill"

step watchdog
mkdir -p /etc/systemd/system/uniond.service.d
printf '[Service]\nWatchdogSec=3s\n' > /etc/systemd/system/uniond.service.d/e2e-watchdog.conf
systemctl daemon-reload
systemctl restart uniond.service
systemctl show -P WatchdogUSec uniond.service > "$OUT/watchdog-usec"
n=$(systemctl show -P NRestarts uniond.service)
sleep 4   # longer than WatchdogSec: a live daemon keeps pinging and is not restarted
echo "$n $(systemctl show -P NRestarts uniond.service)" > "$OUT/watchdog-restarts-while-alive"
pid=$(systemctl show -P MainPID uniond.service)
t=$(now)
kill -STOP "$pid"
wait_for 20 restarted "$n"; echo $? > "$OUT/watchdog-restarted.rc"
echo "$t $(now)" > "$OUT/watchdog-wall"
echo "$pid $(systemctl show -P MainPID uniond.service)" > "$OUT/watchdog-pids"
show > "$OUT/after-watchdog"
call ListMounts > "$OUT/list-after-watchdog.json"
rm /etc/systemd/system/uniond.service.d/e2e-watchdog.conf
systemctl daemon-reload

step stop
systemctl stop uniond.service; echo $? > "$OUT/stop.rc"
show > "$OUT/after-stop"
findmnt -n -o FSTYPE $S/merge > "$OUT/a-after-stop"

step activation
# Back to PID 1's usual log level. At debug level the forked child logs "Executing: ..."
# before it is moved into the unit's cgroup, and journald then keeps attributing that
# PID's lines to init.scope for a while: `journalctl -u uniond` would miss them. From
# here on, the daemon's lines must be found the way an administrator looks for them.
systemd-analyze log-level info
show > "$OUT/before-activation"
call ListMounts > "$OUT/activation.json" 2> "$OUT/activation.err"
show > "$OUT/after-activation"

step upgrade
# Installing the package again (as an upgrade does) restarts uniond, which adopts
# the mount that is still live.
pid=$(systemctl show -P MainPID uniond.service)
apt-get install -y --reinstall /deb/uniond_*.deb > "$OUT/reinstall.log" 2>&1; echo $? > "$OUT/reinstall.rc"
echo "$pid $(systemctl show -P MainPID uniond.service)" > "$OUT/reinstall-pids"
show > "$OUT/after-reinstall"
call ListMounts > "$OUT/list-after-reinstall.json"

step unmount
call Unmount 'oa{sv}' "$A" 0 > "$OUT/unmount-a.json" 2> "$OUT/unmount-a.err"; echo $? > "$OUT/unmount-a.rc"
findmnt -n $S/merge > "$OUT/a-after-unmount"
ls -A $S/merge $S/upper $S/l1 > "$OUT/dirs-after-unmount"
call ListMounts > "$OUT/list-after-unmount.json"
# A read-only view of one layer on a mountpoint uniond makes, for the purge below.
E=$(call Mount 'asssa{sv}' 1 $S/l2 "" "" 0 | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0])')
prop "$E" Mountpoint > "$OUT/mountpoint-e"

step purge
apt-get purge -y uniond > "$OUT/purge.log" 2>&1; echo $? > "$OUT/purge.rc"
systemctl show -P LoadState uniond.service > "$OUT/after-purge-loadstate"
busctl list --activatable --no-legend | awk '{print $1}' > "$OUT/after-purge-activatable"
cat "$(cat "$OUT/mountpoint-e")"/c > "$OUT/e-after-purge"
ls -d /etc/uniond /var/lib/uniond > "$OUT/after-purge-dirs" 2> "$OUT/after-purge-dirs.err"

step end
date +%s.%N > "$OUT/t-end"
journalctl -o json --no-pager > "$OUT/journal.json"
journalctl -u uniond.service -o json --no-pager > "$OUT/journal-u.json"
