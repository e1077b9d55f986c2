#!/bin/sh
# Makes a private CA and certificates for a fedwarden deployment (EC P-256, valid 825 days).
#
#   deploy/gen-certs.sh OUT_DIR SERVER_NAMES NAME...
#
# SERVER_NAMES: the coordinator's host names and IPs, comma-separated; the first is its common
#   name, e.g. "coordinator.example.org,10.0.0.5" (localhost and 127.0.0.1 are always added).
# NAME...: one client certificate per name; the common name is the identity the coordinator sees
#   (an agent's client id, or an operator name given to `fedwarden serve --operator NAME`).
#
# Writes OUT_DIR/ca.pem (give it to every machine), ca.key (keep it offline), server.pem and
# server.key (the coordinator only), NAME.pem and NAME.key (that machine only). Existing files are
# kept, so running it again only adds what is missing.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 OUT_DIR SERVER_NAMES [NAME...]" >&2; exit 2; }
out=$1 server_names=$2
shift 2
mkdir -p "$out"
cd "$out"
umask 077
days=825

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ ! -f ca.pem ]; then
  key ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=fedwarden CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.pem
fi

sign() {  # sign NAME EXTFILE
  key "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$1" -out "$1.csr"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days $days \
    -extfile "$2" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$2"
}

if [ ! -f server.pem ]; then
  cn=${server_names%%,*}
  san="DNS:localhost,IP:127.0.0.1"
  for n in $(echo "$server_names" | tr ',' ' '); do
    case $n in
      *[!0-9.]*) san="$san,DNS:$n" ;;
      *) san="$san,IP:$n" ;;
    esac
  done
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$san" > server.ext
  key server.key
  openssl req -new -key server.key -subj "/CN=$cn" -out server.csr
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days $days \
    -extfile server.ext -out server.pem 2>/dev/null
  rm -f server.csr server.ext
fi

for name in "$@"; do
  [ -f "$name.pem" ] && continue
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' > "$name.ext"
  sign "$name" "$name.ext"
done
chmod 644 ./*.pem
echo "certificates in $out: ca.pem, server.pem/.key${*:+, and one pair per name: $*}"
