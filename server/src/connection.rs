//! Accepting connections, with deadlines for clients that stop sending.
//!
//! `axum::serve` waits forever for a request's header or body: a client that sends half a
//! request (or nothing) holds its connection and a task indefinitely. Here each connection is
//! served by hyper-util's HTTP/1 + HTTP/2 builder with a header-read timeout (after it the
//! connection is closed), and [`body_deadline`] reads each request body within a deadline
//! (after it the client gets a 408 in its API's error shape). Responses, streamed ones
//! included, are not limited: a reply may take as long as generation takes.
//!
//! At shutdown the listener stops accepting and every connection is drained (hyper-util's
//! `GracefulShutdown`): a response being written is finished, idle keep-alive connections are
//! closed, for at most a grace period.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use crate::app::AppState;
use crate::error::{ApiError, ErrorKind};

/// How long a client may take to send a request's header, and then its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadTimeouts {
    pub header: Duration,
    pub body: Duration,
}

impl Default for ReadTimeouts {
    /// 30 s for the header (hyper's default once a timer is set), 60 s for the body.
    fn default() -> Self {
        ReadTimeouts { header: Duration::from_secs(30), body: Duration::from_secs(60) }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then drains the open connections for
/// at most `grace` (responses in progress finish; see the module docs); connections that do not
/// send their header within `timeouts.header` are closed.
pub async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    timeouts: ReadTimeouts,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(timeouts.header);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: wait a little rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let service = TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A connection's end, clean or not (reset, timeout), concerns only that client.
            let _ = connection.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
}

/// Middleware: reads the request body within the body deadline and at most the body limit,
/// then hands the buffered request on. A client too slow gets a 408, one too large a 413,
/// both in its API's error shape.
pub async fn body_deadline(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let read = axum::body::to_bytes(body, state.max_body_bytes);
    let error = match tokio::time::timeout(state.read_timeouts.body, read).await {
        Ok(Ok(bytes)) => return next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(Err(e)) if is_length_limit(&e) => {
            ApiError::new(ErrorKind::PayloadTooLarge, "the request body is larger than this server accepts")
        }
        Ok(Err(e)) => ApiError::invalid(format!("cannot read the request body: {e}")),
        Err(_) => ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            ..ApiError::invalid(format!(
                "the request body did not arrive within {} s",
                state.read_timeouts.body.as_secs_f64()
            ))
        },
    };
    if path.starts_with("/v1/messages") {
        crate::anthropic::error_response(&error)
    } else {
        error.openai_response()
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}
