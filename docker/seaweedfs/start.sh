#!/bin/sh
# Entry point of the compose service seaweedfs: writes SeaweedFS's S3 identity file from the
# credentials in the environment (docker/compose.env), so that no key sits in a file of the
# repository, then starts master, volume server, filer and S3 gateway in one process.
# The only identity is the backup repository's: unsigned (anonymous) requests are refused.
set -eu
if [ -z "${PGINCR_S3_ACCESS_KEY:-}" ] || [ -z "${PGINCR_S3_SECRET_KEY:-}" ]; then
    echo "seaweedfs: PGINCR_S3_ACCESS_KEY / PGINCR_S3_SECRET_KEY are not set; put them in docker/compose.env" >&2
    exit 1
fi
umask 077
config=/tmp/pgincr-s3.json
cat > "$config" <<JSON
{
  "identities": [
    {
      "name": "pgincr",
      "credentials": [{"accessKey": "${PGINCR_S3_ACCESS_KEY}", "secretKey": "${PGINCR_S3_SECRET_KEY}"}],
      "actions": ["Admin", "Read", "List", "Tagging", "Write"]
    }
  ]
}
JSON
exec weed server \
    -dir=/data \
    -ip=seaweedfs -ip.bind=0.0.0.0 \
    -volume.max=0 -master.volumeSizeLimitMB=1024 \
    -filer \
    -s3 -s3.port=8333 -s3.config="$config"
