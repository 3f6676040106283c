#!/usr/bin/env bash
# Self-signed TLS material for a local Flower deployment (SuperLink on loopback).
#
#   bash deploy/gen_certs.sh OUT_DIR [EXTRA_SAN ...]
#
# Writes OUT_DIR/ca.crt + ca.key (a throw-away CA) and OUT_DIR/server.pem + server.key (the
# SuperLink's certificate, signed by that CA) with subjectAltName DNS:localhost, IP:127.0.0.1,
# IP:::1 plus any EXTRA_SAN given as "DNS:name" or "IP:addr" (e.g. "DNS:superlink" for the
# docker compose service name, or "IP:192.168.1.10" for a laptop on the LAN that Raspberry Pis
# connect to). SuperNodes and the `flwr` CLI verify the SuperLink with ca.crt
# (`--root-certificates` / `root-certificates = ...`). Valid for 30 days; re-run to renew.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 OUT_DIR [DNS:name|IP:addr ...]" >&2
  exit 2
fi
out="$1"; shift
days="${FEDZO_CERT_DAYS:-30}"
mkdir -p "$out"
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for extra in "$@"; do
  case "$extra" in
    DNS:*|IP:*) san="$san,$extra" ;;
    *) echo "extra SAN must look like DNS:name or IP:addr, got '$extra'" >&2; exit 2 ;;
  esac
done
umask 077
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$out/ca.key" -out "$out/ca.crt" \
  -days "$days" -subj "/CN=fedzo-flwr local CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout "$out/server.key" -out "$out/server.csr" \
  -subj "/CN=localhost" 2>/dev/null
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" \
  "$san" > "$out/san.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -out "$out/server.pem" -days "$days" -extfile "$out/san.ext" 2>/dev/null
rm -f "$out/server.csr"
chmod 644 "$out/ca.crt" "$out/server.pem"
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null
echo "certificates in $out: ca.crt, server.pem, server.key (SAN $san)"
