//! Collectives started now and finished later (torch.distributed's `async_op=True` and the
//! `Work` handle it returns): how ZeRO's `overlap_comm` reduces a bucket's gradients while the
//! backward of the layers before it runs.
//!
//! Neither CPU backend has a progress thread: an MPI library moves a nonblocking collective's
//! data when the process calls into it, and the in-process rendezvous is plain shared memory. So
//! the caller polls [`Work::is_completed`] between pieces of its own work (the engine: between
//! layers) and [`Work::wait`]s for what is left before it reads the result. A backend without a
//! nonblocking path (the default) does the whole collective when it is started.
use super::{check_reduce_scatter, Communicator, ElemKind, Element, ProcessGroup, ReduceOp};
use candle_core::{bail, Result};
use std::marker::PhantomData;
use std::sync::Arc;

/// A buffer handed to a collective that may read it after the call that started it returns:
/// the collective keeps it alive (no copy of the caller's data is made).
pub trait SendBuffer: Send + Sync + 'static {
    fn bytes(&self) -> &[u8];
}

impl<T: Element> SendBuffer for Vec<T> {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self)
    }
}

/// A reduce-scatter in flight (see [`Communicator::reduce_scatter_start`]).
pub trait Work: Send + Sync {
    /// Moves the collective on; true once [`Work::wait`] will not wait for a peer.
    fn is_completed(&mut self) -> Result<bool>;
    /// Waits for the peers (bounded by the communicator's deadline, like every collective) and
    /// writes this member's reduced chunk into `recv`.
    fn wait(self: Box<Self>, recv: &mut [u8]) -> Result<()>;
}

/// A collective that was complete when started: its result.
pub(crate) struct Done(pub Vec<u8>);

impl Work for Done {
    fn is_completed(&mut self) -> Result<bool> {
        Ok(true)
    }
    fn wait(self: Box<Self>, recv: &mut [u8]) -> Result<()> {
        if recv.len() != self.0.len() {
            bail!(
                "reduce_scatter: the result has {} bytes, the receive buffer {}",
                self.0.len(),
                recv.len()
            )
        }
        recv.copy_from_slice(&self.0);
        Ok(())
    }
}

/// The blocking reduce-scatter, done at once: what a backend without a nonblocking path starts.
pub(crate) fn reduce_scatter_now<C: Communicator + ?Sized>(
    comm: &C,
    group: &[usize],
    send: &dyn SendBuffer,
    kind: ElemKind,
    op: ReduceOp,
) -> Result<Box<dyn Work>> {
    let mut recv = vec![0u8; send.bytes().len() / group.len().max(1)];
    comm.reduce_scatter_bytes(group, send.bytes(), &mut recv, kind, op)?;
    Ok(Box::new(Done(recv)))
}

/// A typed reduce-scatter in flight over a [`ProcessGroup`].
pub struct ReduceScatterWork<T> {
    work: Box<dyn Work>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Element> ReduceScatterWork<T> {
    /// A reduction that needed no peer (a group of one): `result` is this member's chunk.
    pub fn done(result: Vec<T>) -> Self {
        Self {
            len: result.len(),
            work: Box::new(Done(bytemuck::cast_slice(&result).to_vec())),
            _t: PhantomData,
        }
    }

    /// See [`Work::is_completed`].
    pub fn is_completed(&mut self) -> Result<bool> {
        self.work.is_completed()
    }

    /// Elements of this member's chunk.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Waits and writes this member's reduced chunk into `recv` (of [`Self::len`] elements).
    pub fn wait(self, recv: &mut [T]) -> Result<()> {
        if recv.len() != self.len {
            bail!(
                "reduce_scatter: the chunk has {} elements, the receive buffer {}",
                self.len,
                recv.len()
            )
        }
        self.work.wait(bytemuck::cast_slice_mut(recv))
    }
}

impl ProcessGroup {
    /// Starts a reduce-scatter of `send` (group size x chunk elements, member k's chunk k)
    /// without waiting for the peers; the group's collectives keep the order they are started
    /// in. The same bits as [`Communicator::reduce_scatter_bytes`].
    pub fn reduce_scatter_start<T: Element>(
        &self,
        send: Vec<T>,
        op: ReduceOp,
    ) -> Result<ReduceScatterWork<T>> {
        let len = send.len() / self.size();
        check_reduce_scatter(&self.group, send.len(), len)?;
        let work = if self.size() == 1 {
            Box::new(Done(bytemuck::cast_slice(&send).to_vec()))
        } else {
            self.comm
                .clone()
                .reduce_scatter_start(&self.group, Arc::new(send), T::KIND, op)?
        };
        Ok(ReduceScatterWork {
            work,
            len,
            _t: PhantomData,
        })
    }
}
