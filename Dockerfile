# tokenrelay container image.
#
# The final image is FROM scratch: a statically linked tokenrelay, the CA bundle, and
# nothing else (no shell, no package manager). Nothing is compiled or pulled here:
# scripts/build-image.sh builds the static binary, stages it with the CA bundle under
# target/image/, and builds this file with the repository root as the context:
#
#   scripts/build-image.sh                                   # buildah, no daemon needed
#   scripts/build-image.sh --no-build && docker build -t tokenrelay:dev .
#
# The proxy listener (8081 by convention) and the admin listener (9090) are set in the
# config; the file store lives in the /var/lib/tokenrelay volume.
FROM scratch

ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tokenrelay" \
      org.opencontainers.image.description="Reverse-proxy sidecar that attaches OAuth2 bearer tokens and never loses a rotating refresh token" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

# Users and host lookup order (glibc's static DNS and files modules need no NSS libraries).
COPY deploy/container/passwd deploy/container/group deploy/container/nsswitch.conf /etc/
# Trusted roots for TLS to token endpoints and upstreams.
COPY target/image/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# The statically linked binary, owned by root and not writable by the runtime user.
COPY target/image/tokenrelay /tokenrelay
# The state directory (file store), owned by the runtime user; its parents stay root's.
COPY target/image/empty/ /var/lib/
COPY --chown=65532:65532 target/image/empty/ /var/lib/tokenrelay/

# "/" ends PATH so that `kubectl exec POD -- tokenrelay status` finds /tokenrelay.
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    TOKENRELAY_CONFIG=/etc/tokenrelay/config.yaml \
    PATH=/usr/local/bin:/usr/bin:/bin:/

USER 65532:65532
VOLUME ["/var/lib/tokenrelay"]
EXPOSE 8081 9090
ENTRYPOINT ["/tokenrelay"]
CMD ["run", "--config", "/etc/tokenrelay/config.yaml"]
