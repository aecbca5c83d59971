//! zone-ingress: an eBPF-accelerated ZoneIngress for multi-zone Kuma.
//!
//! Modules in the order data flows through them:
//! [`config`] (ZoneIngress resource, standalone routes) → [`routes`] (immutable SNI → endpoints
//! snapshot, swapped atomically) → [`listener`] (accept, [`tls`] ClientHello read, route,
//! [`upstream`] connect with failover) → [`datapath`] (userspace copy, kernel splice via [`bpf`]).
//! [`stats`], [`accesslog`] and [`admin`] observe; [`reload`] (files) and [`cp`] (the Kuma
//! control plane's ADS stream) swap route tables; [`maps`] reads the pinned BPF maps for
//! operators (`zone-ingress maps dump`). [`guard`] (XDP) filters packets to the listener before
//! the kernel's stack sees them. [`privs`] checks and drops Linux capabilities. [`handoff`] moves
//! sockets and spliced flows to a new agent (hot restart); [`service`] tells systemd.

pub mod accesslog;
pub mod admin;
pub mod agent;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod cp;
pub mod datapath;
pub mod guard;
pub mod handoff;
pub mod kernel_btf;
pub mod listener;
pub mod maps;
pub mod privs;
pub mod reload;
pub mod routes;
pub mod service;
pub mod stats;
pub mod tls;
pub mod upstream;
pub mod xds;
