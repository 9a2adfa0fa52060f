#!/usr/bin/env bash
# Starts the local PostgreSQL and RabbitMQ servers if they are stopped (the test suite needs both).
set -u
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if ! pg_up && command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "ensure-services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if ! amqp_up && command -v rabbitmq-server >/dev/null 2>&1; then
  echo "ensure-services: starting RabbitMQ"
  rabbitmq-server -detached || true
fi
for _ in $(seq 1 60); do
  if pg_up && amqp_up; then exit 0; fi
  sleep 1
done
pg_up || echo "ensure-services: PostgreSQL is not reachable on 127.0.0.1:5432"
amqp_up || echo "ensure-services: RabbitMQ is not reachable on 127.0.0.1:5672"
exit 0
