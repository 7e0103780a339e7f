if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now tesserad.service tesserad.socket tesserad-workload.socket tesserad-metrics.socket >/dev/null 2>&1 || :
fi
