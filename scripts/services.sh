#!/usr/bin/env bash
# Make sure PostgreSQL, RabbitMQ and Redis answer on localhost; start any that does not.
set -euo pipefail

answers() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

wait_for() { # name port seconds
  local name=$1 port=$2 seconds=$3
  for _ in $(seq 1 "$((seconds * 2))"); do
    answers 127.0.0.1 "$port" && return 0
    sleep 0.5
  done
  echo "services: $name did not come up on port $port within ${seconds}s" >&2
  return 1
}

if ! answers 127.0.0.1 5432; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  wait_for PostgreSQL 5432 60
fi

if ! answers 127.0.0.1 6379; then
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis 6379 30
fi

if ! answers 127.0.0.1 5672; then
  # `ping` answers while the node runs, even with its application stopped.
  if command -v rabbitmq-diagnostics >/dev/null && rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    echo "services: starting the RabbitMQ application"
    rabbitmqctl -q start_app
  else
    echo "services: starting RabbitMQ"
    rabbitmq-server -detached
  fi
  wait_for RabbitMQ 5672 120
  rabbitmqctl -q await_startup >/dev/null 2>&1 || true
fi
