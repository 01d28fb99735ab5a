//! A running dynplug server over the sample plugins, for the façade tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dynplug::PluginManager;
use dynplug::serve::proto::v1::{self, plugins_client::PluginsClient, value::Kind};
use dynplug::serve::{Endpoint, Running, Server};
use tonic::transport::Channel;

use super::http::{Reply, exchange};

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub manager: PluginManager,
    pub running: Option<Running>,
    pub http: std::net::SocketAddr,
    pub grpc: std::net::SocketAddr,
}

impl Fixture {
    pub async fn start() -> Fixture {
        let dir = super::private_tempdir();
        for sample in ["hello", "counter", "panicking", "slow"] {
            super::install(dir.path(), sample);
        }
        let manager = PluginManager::new(dir.path()).unwrap();
        let report = manager.load_plugins().unwrap();
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let running = Server::new(manager.clone())
            .http("127.0.0.1:0".parse().unwrap())
            .http_unix(dir.path().join(".http.sock"))
            .grpc("127.0.0.1:0".parse().unwrap())
            .grpc_unix(dir.path().join(".grpc.sock"))
            .goplugin_sockets(dir.path().join(".goplugin"))
            .timeout(Duration::from_secs(5))
            .start()
            .await
            .unwrap();
        let tcp = |endpoints: &[Endpoint]| match endpoints[0] {
            Endpoint::Tcp(addr) => addr,
            _ => unreachable!("TCP first"),
        };
        Fixture {
            http: tcp(running.http_endpoints()),
            grpc: tcp(running.grpc_endpoints()),
            dir,
            manager,
            running: Some(running),
        }
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[], b"").await
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let stream = tokio::net::TcpStream::connect(self.http).await.unwrap();
        exchange(stream, method, path, headers, body).await
    }

    pub async fn grpc(&self) -> PluginsClient<Channel> {
        PluginsClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }
}

/// Polls until `check` passes (routes follow events asynchronously).
pub async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn string(s: &str) -> v1::Value {
    v1::Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

pub async fn grpc_over_unix(path: &Path) -> Channel {
    let path = path.to_owned();
    tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .unwrap()
}
