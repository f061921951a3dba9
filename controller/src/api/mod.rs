//! The controller's edges towards humans and scrapers: the admin gRPC
//! service (`admin`), the TLS listener (`server`), `/metrics` and systemd's
//! readiness and watchdog (`systemd`).
//! Only here and in `agents::service` are generated protobuf types used.

pub mod admin;
pub mod metrics;
pub mod server;
pub mod systemd;
