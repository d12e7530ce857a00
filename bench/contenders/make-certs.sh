#!/bin/sh
# Generate a throwaway CA and a server certificate for loopback TLS tests.
#
# Usage: make-certs.sh CERT_DIR [PKCS12_PASSWORD]
#
# Produces in CERT_DIR:
#   ca.key ca.pem              self-signed CA (trust anchor for clients)
#   server.key server.pem      server cert signed by the CA,
#                              SAN = DNS:localhost, DNS:bench.test, IP:127.0.0.1
#   server-chain.pem           server.pem + ca.pem
#   server.p12                 PKCS#12 identity (key + cert + CA) for rathole's
#                              [server.transport.tls] pkcs12, password as given
#                              (default "benchpass")
#   server-bundle.pem          server.key + server.pem in one file (PageKite
#                              --tls_endpoint / --pemfile format)
#
# Needs only the `openssl` CLI (Debian package `openssl`, OpenSSL 3.x).
set -eu

dir=${1:?usage: make-certs.sh CERT_DIR [PKCS12_PASSWORD]}
pass=${2:-benchpass}
mkdir -p "$dir"
cd "$dir"

# CA (EC P-256 keeps generation instant)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout ca.key -out ca.pem -days 30 -subj "/CN=shroud-bench throwaway CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# Server key + CSR
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null

cat > server.ext <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,DNS:bench.test,IP:127.0.0.1
EOF

openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
  -out server.pem -days 30 -extfile server.ext 2>/dev/null

cat server.pem ca.pem > server-chain.pem
cat server.key server.pem > server-bundle.pem

# PKCS#12 for rathole (native-tls -> OpenSSL). OpenSSL 3 default algorithms
# (AES-256-CBC / PBKDF2) are fine because rathole links the same OpenSSL 3.
openssl pkcs12 -export -out server.p12 -inkey server.key -in server.pem \
  -certfile ca.pem -name server -passout "pass:$pass"

rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key server.p12 server-bundle.pem
echo "certs written to $dir"
