# The agent's image, for users with registry access:
#
#   cargo xtask build && podman build -t localhost/mesh-redirect:0.1.0 .
#
# (`cargo xtask build` leaves the release binary without its debug
# information in target/dist/, the one file the build context holds.)
#
# `cargo xtask image` builds the same layout offline, without this file's
# registry pull: Debian bookworm's minimal base, slimmed as bookworm-slim
# is, plus the packages and the binary below (it checks that this file
# still says the same before it builds).
#
# One image for every role: the node agent (`node`, `install-cni`), the
# eBPF sidecar (`run`), and the istio-init drop-in (`iptables ...`, with
# istio's injection arguments).
FROM debian:bookworm-slim

# iptables: both backends (iptables-legacy and iptables-nft), the fallback
# mode and the istio-init drop-in; iproute2: the pod's addresses and routes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables iproute2 \
    && rm -rf /var/lib/apt/lists/*

COPY target/dist/mesh-redirect /usr/local/bin/mesh-redirect

LABEL org.opencontainers.image.title=mesh-redirect org.opencontainers.image.version=0.1.0

ENTRYPOINT ["/usr/local/bin/mesh-redirect"]
CMD ["doctor"]
