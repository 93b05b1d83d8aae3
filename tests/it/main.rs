//! Integration tests: real PostgreSQL, real RabbitMQ, the stub API on a loopback port.
//! Every test owns its database and its queue names, so they run in parallel.

mod adaptive;
mod check;
mod cli;
mod config;
mod consumer;
mod errors;
mod faults;
mod fixtures;
mod harness;
mod ledger;
mod lifecycle;
mod metrics;
mod migrations;
mod pipeline;
mod poison;
mod pooler;
mod proxy;
mod queues;
mod reconnect;
mod requests;
mod restarts;
mod resume;
mod robust;
mod safety;
mod security;
mod settle;
mod shutdown;
mod sink;
mod source;
mod support;
mod sweep;
mod tls;
mod torture;
