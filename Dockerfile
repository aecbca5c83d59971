# syntax=docker/dockerfile:1
#
# zone-ingress container image: the BPF programs and the agent are built by `cargo xtask build`
# (the same command as on a developer machine), the runtime image holds only the binary.
#
#   docker build -t zone-ingress:0.1.0 .                     # BuildKit (Docker 23+ default)
#   docker run --rm --cap-drop ALL --cap-add BPF --cap-add NET_ADMIN \
#     -v /sys/fs/bpf:/sys/fs/bpf zone-ingress:0.1.0 run --help
#
# Kubernetes: deploy/kubernetes/ (README.md, "Deploying").

# ---- builder: Rust stable (the workspace's rust-version) + the nightly for the BPF crate -------
FROM rust:1.95-bookworm AS builder

# The BPF crate builds with a nightly whose bundled LLVM bpf-linker is built against (xtask
# builds bpf-linker 0.13 against the nightly's own libLLVM, LLVM 22). Pinned by date so a rebuild
# gets the same LLVM; xtask asks for the toolchain named `nightly`, so the dated one is installed
# under that name too.
ARG RUST_NIGHTLY_DATE=2026-05-20
RUN rustup toolchain install "nightly-${RUST_NIGHTLY_DATE}" --profile minimal --component rust-src \
 && ln -s "nightly-${RUST_NIGHTLY_DATE}-x86_64-unknown-linux-gnu" \
      "${RUSTUP_HOME}/toolchains/nightly-x86_64-unknown-linux-gnu" \
 && rustc +nightly --version

WORKDIR /src
COPY . .

# `cargo xtask build`: bpf-linker (cached under ~/.cache), the BPF object with the nightly, then
# `cargo build --release -p zone-ingress` with the object embedded -> target/release/zone-ingress.
# Debug info is stripped for the image (the embedded BPF object and its BTF are data, untouched).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/root/.cache/zone-ingress-toolchain \
    --mount=type=cache,target=/src/target \
    cargo xtask build \
 && mkdir -p /out \
 && strip --strip-debug -o /out/zone-ingress target/release/zone-ingress \
 && /out/zone-ingress --version

# ---- runtime: glibc + libgcc only (the agent links nothing else; rustls, no OpenSSL) ------------
# Same Debian release as the builder, so the glibc the binary was linked against is there. Runs as
# uid 0 because added capabilities reach root only in Kubernetes (and bpffs is root's); the
# Kubernetes manifests and the systemd unit drop every capability but CAP_BPF and CAP_NET_ADMIN.
FROM gcr.io/distroless/cc-debian12 AS runtime
COPY --from=builder /out/zone-ingress /usr/local/bin/zone-ingress
# 10001: mTLS from other zones; 9901: admin (/ready, /stats/prometheus).
EXPOSE 10001 9901
ENTRYPOINT ["/usr/local/bin/zone-ingress"]
CMD ["run"]
