//! The budget of task bytes in flight.
//!
//! Tasks are encoded when their clients pull them. When a round's tasks are posted, every
//! waiting client's pull wakes at once; without a bound, the server would encode them all and
//! hold every encoded copy until the slowest client has read its own. A pull instead reserves
//! its task's size from the budget (`server.max_task_mib_in_flight`) before encoding, and
//! the reservation rides on the response body ([`DeliveryPermit`]), released when the body
//! has been sent (or the call dropped). A task larger than the whole budget is sent alone.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::codegen::http;

/// The budget of task bytes in flight, in KiB permits.
pub(crate) struct DeliveryBudget {
    permits: Arc<Semaphore>,
    kib: u32,
}

/// A reservation of task bytes, held by a Pull response until its body is sent.
#[derive(Clone)]
pub(crate) struct DeliveryPermit {
    _held: Arc<OwnedSemaphorePermit>,
}

impl DeliveryBudget {
    /// A budget of `bytes` (at least 1 KiB).
    pub(crate) fn new(bytes: u64) -> Self {
        let kib = (bytes / 1024).clamp(1, u64::from(u32::MAX >> 3)) as u32;
        Self {
            permits: Arc::new(Semaphore::new(kib as usize)),
            kib,
        }
    }

    /// Waits for room for `bytes` (a task larger than the budget waits for all of it).
    pub(crate) async fn reserve(&self, bytes: u64) -> Option<DeliveryPermit> {
        let kib = bytes.div_ceil(1024).clamp(1, u64::from(self.kib)) as u32;
        let permit = self.permits.clone().acquire_many_owned(kib).await.ok()?;
        Some(DeliveryPermit {
            _held: Arc::new(permit),
        })
    }

    /// KiB free now.
    #[cfg(test)]
    pub(crate) fn available_kib(&self) -> usize {
        self.permits.available_permits()
    }
}

/// Moves a [`DeliveryPermit`] the handler put in the response's extensions onto its body, so
/// the reservation lasts until the bytes have gone out.
pub(crate) fn hold_until_sent(response: http::Response<Body>) -> http::Response<Body> {
    let (mut parts, body) = response.into_parts();
    match parts.extensions.remove::<DeliveryPermit>() {
        Some(permit) => http::Response::from_parts(
            parts,
            Body::new(HeldBody {
                body,
                _permit: permit,
            }),
        ),
        None => http::Response::from_parts(parts, body),
    }
}

/// A response body holding a reservation until it is dropped (sent in full, or abandoned).
struct HeldBody {
    body: Body,
    _permit: DeliveryPermit,
}

impl tonic::codegen::Body for HeldBody {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_reservation_lasts_until_the_body_is_sent() {
        let budget = DeliveryBudget::new(100 * 1024);
        let permit = budget.reserve(60 * 1024).await.unwrap();
        assert_eq!(budget.available_kib(), 40);
        // A second task that does not fit waits.
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            budget.reserve(60 * 1024),
        )
        .await;
        assert!(waiting.is_err(), "a task over the free budget must wait");
        // The permit travels from the extensions to the body, and is released once the body
        // has been read to its end.
        let task = http_body_util::Full::new(tonic::codegen::Bytes::from_static(b"task bytes"))
            .map_err(|never| match never {});
        let mut response = http::Response::new(Body::new(task));
        response.extensions_mut().insert(permit);
        let held = hold_until_sent(response);
        assert!(held.extensions().get::<DeliveryPermit>().is_none());
        assert_eq!(budget.available_kib(), 40);
        let sent = held.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&sent[..], b"task bytes");
        assert_eq!(budget.available_kib(), 100);
        // A task larger than the whole budget takes all of it, alone.
        let all = budget.reserve(10 << 20).await.unwrap();
        assert_eq!(budget.available_kib(), 0);
        drop(all);
        assert_eq!(budget.available_kib(), 100);
    }
}
