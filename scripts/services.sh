#!/usr/bin/env bash
# Start the machine's Redis and/or PostgreSQL if nothing answers on their ports (CI machines have
# both installed; normally already running). Usage: scripts/services.sh [redis] [postgres]
set -euo pipefail
services=("$@")
[ ${#services[@]} -gt 0 ] || services=(redis postgres)
for service in "${services[@]}"; do
  case "$service" in
    redis)
      if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
        echo "starting redis-server on 127.0.0.1:6379"
        mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
          --dir /var/lib/redis --logfile /var/log/redis/ci.log
      fi ;;
    postgres)
      if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
        echo "starting PostgreSQL on 127.0.0.1:5432"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
      fi ;;
    *) echo "unknown service $service" >&2; exit 2 ;;
  esac
done
for _ in $(seq 1 30); do  # wait until they answer
  ok=1
  for service in "${services[@]}"; do
    port=$([ "$service" = redis ] && echo 6379 || echo 5432)
    (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null || ok=0
  done
  [ $ok = 1 ] && exit 0
  sleep 1
done
echo "services did not come up" >&2; exit 1
