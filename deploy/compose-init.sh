#!/bin/sh
# One-shot setup for docker-compose.yml: a private CA, then each identity's files in a directory
# of its own (a volume that only that service mounts), and a Grafana admin password.
#
#   deploy/compose-init.sh CA_DIR SECRETS_DIR NAME...
#
# CA_DIR keeps the CA key and every private key as gen-certs.sh made them; only this script sees
# it. SECRETS_DIR/coordinator gets ca.pem, server.pem, server.key and allow.txt (every NAME but
# operator, pinned to its certificate's fingerprint); SECRETS_DIR/NAME gets ca.pem,
# NAME.pem, NAME.key; SECRETS_DIR/grafana gets admin_password (random, made once). Files are 0400
# and directories 0500, owned by the user that reads them: uid 10001 (the fedwarden image) and
# uid 472 (Grafana's image), when run as root. Running it again keeps the CA, the certificates and
# the password.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 CA_DIR SECRETS_DIR [NAME...]" >&2; exit 2; }
ca=$1 secrets=$2
shift 2
here=$(dirname "$0")
umask 077
"$here/gen-certs.sh" "$ca" coordinator "$@" >/dev/null

give() {  # give OWNER DIR FILE...: copies FILEs from the CA dir, readable by OWNER only
  owner=$1 dir=$secrets/$2
  shift 2
  mkdir -p "$dir"
  chmod 0700 "$dir"  # writable again on a second run
  for f in "$@"; do
    cp "$ca/$f" "$dir/$f.tmp" && mv "$dir/$f.tmp" "$dir/$f"
    chmod 0400 "$dir/$f"
  done
  [ "$(id -u)" != 0 ] || chown -R "$owner" "$dir"
  chmod 0500 "$dir"
}

# The coordinator's allow-list: each training identity pinned to its certificate's fingerprint
# (the operator is named by --operator, not trained with). Delete a line to revoke a client.
: > "$ca/allow.txt"
for name in "$@"; do
  [ "$name" = operator ] && continue
  print=$(openssl x509 -in "$ca/$name.pem" -noout -fingerprint -sha256 | sed 's/.*=//; s/://g' | tr 'A-F' 'a-f')
  echo "$name sha256:$print" >> "$ca/allow.txt"
done

give 10001 coordinator ca.pem server.pem server.key allow.txt
for name in "$@"; do
  give 10001 "$name" ca.pem "$name.pem" "$name.key"
done

mkdir -p "$secrets/grafana"
if [ ! -s "$secrets/grafana/admin_password" ]; then
  chmod 0700 "$secrets/grafana"
  openssl rand -hex 16 > "$secrets/grafana/admin_password"
fi
chmod 0400 "$secrets/grafana/admin_password"
[ "$(id -u)" != 0 ] || chown -R 472 "$secrets/grafana"
chmod 0500 "$secrets/grafana"
echo "compose-init: CA in $ca; secrets for coordinator${*:+ $*} and grafana in $secrets"
