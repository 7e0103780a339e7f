# Safe without a running systemd: each step is skipped when its tool or PID 1 is absent.
if command -v systemd-sysusers >/dev/null 2>&1; then systemd-sysusers /usr/lib/sysusers.d/tesserad.conf || :; fi
if command -v systemd-tmpfiles >/dev/null 2>&1; then systemd-tmpfiles --create /usr/lib/tmpfiles.d/tesserad.conf || :; fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
    if [ "$1" -eq 1 ]; then systemctl preset tesserad.socket tesserad-workload.socket tesserad.service >/dev/null 2>&1 || :; fi
fi
