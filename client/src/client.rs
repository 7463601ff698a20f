//! [`Client`]: a connection to a cluster's control process, and the publishers and
//! subscribers of its topics.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use embar_control::http::ClientError;
use embar_control::topics::TopicSpec;
use embar_control::ControlClient;
use embar_dataplane::pool::{OpenOptions, Pool};
use serde_json::Value;

use crate::discovery::{Broker, ClusterView, ControlAddr, ControlSource};
use crate::error::{Error, Result};
use crate::publisher::Publisher;
use crate::subscriber::{StartAt, Subscriber};

/// How publishers reach their brokers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// On the pool host: messages are written straight into log space of the mapped pool.
    #[default]
    Shm,
    /// From any host with an RDMA device (or rxe): batches are RDMA-written into the
    /// brokers' grants (brokers started with `--verbs`; this crate built with the `verbs`
    /// feature).
    Verbs {
        /// The RDMA device; `None`: `$RDMA_DEVICE`, else the first.
        device: Option<String>,
        /// The GID index; `None`: `$RDMA_GID_INDEX`, else 1 (RoCEv2 over IPv4 on rxe).
        gid_index: Option<u8>,
    },
    /// From any host: batches are sent over TCP to the brokers, which read them into their
    /// grants; subscribers read the total order from a broker. Nothing to configure: the
    /// brokers' addresses come from the control process.
    Tcp,
    /// From a host with a DPDK port: batches go as Ethernet frames to the brokers' DPDK
    /// poll loops (brokers started with `--dpdk`; this crate built with the `dpdk` feature).
    /// Sessions open over TCP, so the brokers' addresses come from the control process.
    Dpdk(DpdkOptions),
}

/// How a DPDK publisher reaches its brokers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DpdkOptions {
    /// A port on the brokers' Ethernet segment (device arguments, e.g.
    /// `net_af_packet0,iface=veth1`); `None`: a memif link per broker session.
    pub port: Option<String>,
    /// Largest frame (bytes); `None`: 1514. The broker's limit applies too.
    pub frame_bytes: Option<u32>,
    /// DPDK environment (EAL) options; `None`: virtual devices without hugepages or PCI.
    pub eal_args: Option<Vec<String>>,
    /// Test aids: drop, or corrupt, every Nth data frame sent (0: none).
    pub drop_every: u32,
    pub corrupt_every: u32,
}

impl DpdkOptions {
    /// memif links, the defaults.
    pub fn memif() -> DpdkOptions {
        DpdkOptions::default()
    }
}

impl Transport {
    /// `shm`, `verbs` or `tcp`, as the command line names them.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Shm => "shm",
            Transport::Verbs { .. } => "verbs",
            Transport::Tcp => "tcp",
            Transport::Dpdk(_) => "dpdk",
        }
    }
}

/// What a [`Client`] and everything it opens work with. Build one with [`Client::builder`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// The control process; `None`: discovered (see [`crate::discovery`]).
    pub control: Option<SocketAddr>,
    pub transport: Transport,
    /// Longest wait for a broker (a session, log space, a submission slot) before a
    /// publisher call fails with [`ErrorKind::TimedOut`](crate::ErrorKind::TimedOut).
    pub wait_timeout: Duration,
    /// Longest wait for acknowledgements, by [`Publisher::wait_acks`] and the
    /// acknowledgement futures.
    pub ack_timeout: Duration,
    /// A batch older than this is sealed and sent by the next publisher call (or by an
    /// acknowledgement future that waits on it).
    pub linger: Duration,
    /// Fault the whole pool in when it is mapped (costs time and memory up front in
    /// proportion to the pool: seconds and gigabytes on a large one). Off by default: a
    /// client faults in only what it touches, and each grant of log space in one call as it
    /// takes it, so the data path takes no page fault either way.
    pub populate: bool,
    /// How often a pending future or stream looks again (the first interval; an idle
    /// stream backs off to [`Config::poll_interval_max`]).
    pub poll_interval: Duration,
    pub poll_interval_max: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            control: None,
            transport: Transport::Shm,
            wait_timeout: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(30),
            linger: Duration::from_millis(1),
            populate: false,
            poll_interval: Duration::from_micros(100),
            poll_interval_max: Duration::from_millis(2),
        }
    }
}

/// Builds a [`Client`]: the control address (discovered when not given), the transport,
/// timeouts.
///
/// ```
/// use std::time::Duration;
/// use embar_client::{Client, Transport};
///
/// let builder = Client::builder()
///     .control("127.0.0.1:7400")?
///     .transport(Transport::Shm)
///     .ack_timeout(Duration::from_secs(5))
///     .linger(Duration::from_micros(500));
/// assert_eq!(builder.config().control, Some("127.0.0.1:7400".parse()?));
/// assert_eq!(builder.config().ack_timeout, Duration::from_secs(5));
/// // `builder.connect()?` would now ask that control process for the cluster.
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct ClientBuilder {
    cfg: Config,
}

impl ClientBuilder {
    /// The control process's address (`host:port`).
    pub fn control(mut self, addr: impl ToSocketAddrs) -> Result<ClientBuilder> {
        self.cfg.control = Some(ControlAddr::given(addr)?.addr);
        Ok(self)
    }

    pub fn transport(mut self, t: Transport) -> ClientBuilder {
        self.cfg.transport = t;
        self
    }

    /// See [`Config::wait_timeout`].
    pub fn wait_timeout(mut self, d: Duration) -> ClientBuilder {
        self.cfg.wait_timeout = d;
        self
    }

    /// See [`Config::ack_timeout`].
    pub fn ack_timeout(mut self, d: Duration) -> ClientBuilder {
        self.cfg.ack_timeout = d;
        self
    }

    /// See [`Config::linger`].
    pub fn linger(mut self, d: Duration) -> ClientBuilder {
        self.cfg.linger = d;
        self
    }

    /// See [`Config::populate`].
    pub fn populate(mut self, yes: bool) -> ClientBuilder {
        self.cfg.populate = yes;
        self
    }

    /// See [`Config::poll_interval`]: the first and the longest interval.
    pub fn poll_interval(mut self, first: Duration, max: Duration) -> ClientBuilder {
        self.cfg.poll_interval = first;
        self.cfg.poll_interval_max = max.max(first);
        self
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Finds the control process (given, or discovered) and asks it for the cluster.
    pub fn connect(self) -> Result<Client> {
        let control = match self.cfg.control {
            Some(addr) => ControlAddr {
                addr,
                source: ControlSource::Given,
            },
            None => ControlAddr::discover()?,
        };
        Client::start(control, self.cfg)
    }
}

/// A topic as the control process describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topic {
    /// Name, ORDER, ACK, replication factor, batch size.
    pub spec: TopicSpec,
    /// Its slot in the pool's topic table.
    pub slot: u32,
}

/// A connection to one cluster: its control process, and the pool once a publisher or
/// subscriber on this host needs it. Cheap to share between threads (`&Client`); the
/// publishers and subscribers it opens own what they use and may outlive it.
///
/// ```no_run
/// use embar_client::{Client, StartAt};
///
/// let client = Client::connect("127.0.0.1:7400")?;
/// let mut publisher = client.publisher("orders")?;
/// publisher.publish(b"hello")?;
/// publisher.wait_acks()?;
/// let mut subscriber = client.subscriber("orders", StartAt::Oldest)?;
/// let first = subscriber.next().expect("a message")?;
/// println!("{} {:?}", first.total_order, first.payload);
/// # Ok::<(), embar_client::Error>(())
/// ```
#[derive(Debug)]
pub struct Client {
    control: ControlAddr,
    api: ControlClient,
    cfg: Config,
    pool_path: PathBuf,
    pool: Mutex<Option<Arc<Pool>>>,
}

impl Client {
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Connects with the default [`Config`] to the control process at `control`.
    pub fn connect(control: impl ToSocketAddrs) -> Result<Client> {
        Client::builder().control(control)?.connect()
    }

    /// Connects with the default [`Config`] to the control process that
    /// [`discovery`](crate::discovery) finds (`$EMBAR_CONTROL`, the cluster directory...).
    pub fn discover() -> Result<Client> {
        Client::builder().connect()
    }

    fn start(control: ControlAddr, cfg: Config) -> Result<Client> {
        let api = ControlClient::new(control.addr);
        let mut client = Client {
            control,
            api,
            cfg,
            pool_path: PathBuf::new(),
            pool: Mutex::new(None),
        };
        client.pool_path = client.cluster()?.pool_path;
        Ok(client)
    }

    /// The control process's address, and where it was found.
    pub fn control(&self) -> &ControlAddr {
        &self.control
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The pool's path on the pool host, as the control process names it.
    pub fn pool_path(&self) -> &std::path::Path {
        &self.pool_path
    }

    pub(crate) fn control_error(&self, source: ClientError) -> Error {
        self.control.error(source)
    }

    /// The control process's status document (`GET /v1/status`, docs/control-api.md).
    pub fn status(&self) -> Result<Value> {
        self.api.status().map_err(|e| self.control_error(e))
    }

    /// A topic's settings and pool slot.
    pub fn topic(&self, name: &str) -> Result<Topic> {
        match self.api.describe_topic(name) {
            Ok(v) => self.topic_of(&v),
            Err(ClientError::Api { status: 404, .. }) => Err(Error::UnknownTopic(name.into())),
            Err(e) => Err(self.control_error(e)),
        }
    }

    /// Creates a topic (the control process checks it and fails closed: see
    /// docs/control-api.md, "Topic rules").
    pub fn create_topic(&self, spec: &TopicSpec) -> Result<Topic> {
        self.api
            .create_topic(spec)
            .map_err(|e| self.control_error(e))?;
        self.topic(&spec.name)
    }

    fn topic_of(&self, v: &Value) -> Result<Topic> {
        let malformed = |what| Error::Discovery {
            addr: self.control.addr,
            what,
        };
        let spec: TopicSpec = serde_json::from_value(v["topic"].clone())
            .map_err(|_| malformed("a topic's settings"))?;
        let slot = v["slot"].as_u64().ok_or(malformed("a topic's slot"))? as u32;
        Ok(Topic { spec, slot })
    }

    /// Where the pool is and which brokers are live, as the control process says now.
    pub fn cluster(&self) -> Result<ClusterView> {
        ClusterView::ask(&self.control)
    }

    /// The live brokers, in pool-slot order.
    pub fn live_brokers(&self) -> Result<Vec<Broker>> {
        Ok(self.cluster()?.brokers)
    }

    /// The live brokers that take TCP clients: `(pool slot, address)`.
    pub fn tcp_brokers(&self) -> Result<Vec<(u32, SocketAddr)>> {
        self.cluster()?.tcp_brokers()
    }

    /// The pool, mapped on first use (then shared by everything this client opens). Only on
    /// the pool host; for tools that work on the pool directly. Fails with
    /// [`ErrorKind::PoolLost`](crate::ErrorKind::PoolLost) once the pool's file has been
    /// truncated or replaced under the mapping: what is opened next would fault on it.
    pub fn pool(&self) -> Result<Arc<Pool>> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pool.as_ref() {
            p.check_backing()?;
            return Ok(Arc::clone(p));
        }
        let opened = Arc::new(Pool::open(
            &self.pool_path,
            &OpenOptions {
                populate: self.cfg.populate,
                ..OpenOptions::default()
            },
        )?);
        *pool = Some(Arc::clone(&opened));
        Ok(opened)
    }

    /// A publisher of `topic` over the configured transport, with a session on every live
    /// broker (batches are striped over them).
    pub fn publisher(&self, topic: &str) -> Result<Publisher> {
        Publisher::open(self, topic)
    }

    /// A subscriber of `topic`, reading the pool from `start` (on the pool host).
    pub fn subscriber(&self, topic: &str, start: StartAt) -> Result<Subscriber> {
        Subscriber::open(self, topic, start)
    }
}
