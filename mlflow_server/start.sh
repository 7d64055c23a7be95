#!/usr/bin/env bash
# Start an MLflow tracking server for matxfer, bound to 127.0.0.1 unless HOST says otherwise.
#
#   mlflow_server/start.sh [sqlite|postgres|basic-auth]
#
#   sqlite      (default) SQLite backend + served artifacts under $DATA_DIR
#   postgres    PostgreSQL backend (Debian's postgresql): creates role and database once;
#               needs MATXFER_PG_PASSWORD in the environment (never in the repo)
#   basic-auth  SQLite backend behind MLflow's basic-auth app; needs MLFLOW_ADMIN_PASSWORD;
#               clients set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
#
# Environment: HOST (127.0.0.1), PORT (5000), WORKERS (2), DATA_DIR (mlflow_server/data),
# MLFLOW (mlflow executable, default .venv/bin/mlflow). Point matxfer at it with
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:$PORT
set -euo pipefail
MODE=${1:-sqlite}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-5000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA_DIR=${DATA_DIR:-$ROOT/mlflow_server/data}
MLFLOW=${MLFLOW:-$ROOT/.venv/bin/mlflow}
mkdir -p "$DATA_DIR/artifacts"
ARGS=(--host "$HOST" --port "$PORT" --workers "${WORKERS:-2}"
      --artifacts-destination "$DATA_DIR/artifacts"
      --allowed-hosts "$HOST:$PORT,localhost:$PORT,127.0.0.1:$PORT")

case "$MODE" in
  sqlite)
    exec "$MLFLOW" server --backend-store-uri "sqlite:///$DATA_DIR/mlflow.db" "${ARGS[@]}"
    ;;
  postgres)
    : "${MATXFER_PG_PASSWORD:?set MATXFER_PG_PASSWORD (the database password)}"
    PGDB=${PGDB:-matxfer}; PGUSER_NAME=${PGUSER_NAME:-matxfer}
    command -v psql >/dev/null || { echo "install PostgreSQL: apt-get install -y postgresql" >&2; exit 2; }
    if ! pg_isready -q -h 127.0.0.1; then service postgresql start >/dev/null; fi
    for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
    as_pg() { su postgres -c "psql -v ON_ERROR_STOP=1 -qtAc \"$1\""; }
    if [ -z "$(as_pg "SELECT 1 FROM pg_roles WHERE rolname='$PGUSER_NAME'")" ]; then
      # the password goes through stdin, never onto a command line
      printf "CREATE ROLE %s LOGIN PASSWORD '%s';\n" "$PGUSER_NAME" "$MATXFER_PG_PASSWORD" \
        | su postgres -c "psql -v ON_ERROR_STOP=1 -q"
    fi
    if [ -z "$(as_pg "SELECT 1 FROM pg_database WHERE datname='$PGDB'")" ]; then
      as_pg "CREATE DATABASE $PGDB OWNER $PGUSER_NAME"
    fi
    "$ROOT/.venv/bin/python" -c "import psycopg2" 2>/dev/null \
      || "$ROOT/.venv/bin/pip" install --quiet psycopg2-binary
    export PGPASSWORD=$MATXFER_PG_PASSWORD
    exec "$MLFLOW" server \
      --backend-store-uri "postgresql+psycopg2://$PGUSER_NAME@127.0.0.1:5432/$PGDB" "${ARGS[@]}"
    ;;
  basic-auth)
    : "${MLFLOW_ADMIN_PASSWORD:?set MLFLOW_ADMIN_PASSWORD (password of the admin user)}"
    if [ ${#MLFLOW_ADMIN_PASSWORD} -lt 12 ]; then
      echo "MLFLOW_ADMIN_PASSWORD has ${#MLFLOW_ADMIN_PASSWORD} characters; MLflow needs at least 12" >&2
      exit 2
    fi
    cat > "$DATA_DIR/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///$DATA_DIR/basic_auth.db
admin_username = admin
admin_password = $MLFLOW_ADMIN_PASSWORD
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    chmod 600 "$DATA_DIR/basic_auth.ini"
    # Flask's CSRF key: kept with the data so that restarts and several workers agree
    if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
      [ -s "$DATA_DIR/flask_secret" ] || (umask 077; head -c 32 /dev/urandom | od -An -tx1 \
        | tr -d ' \n' > "$DATA_DIR/flask_secret")
      MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$DATA_DIR/flask_secret")
      export MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    export MLFLOW_AUTH_CONFIG_PATH=$DATA_DIR/basic_auth.ini
    exec "$MLFLOW" server --app-name basic-auth \
      --backend-store-uri "sqlite:///$DATA_DIR/mlflow.db" "${ARGS[@]}"
    ;;
  *)
    echo "mlflow_server/start.sh: unknown mode '$MODE'; allowed: sqlite, postgres, basic-auth" >&2
    exit 2
    ;;
esac
