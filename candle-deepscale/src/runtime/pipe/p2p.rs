//! Point-to-point transfer of activations and their gradients between pipeline stages: a small
//! header (element kind and shape of each tensor) then the data, over the communicator's send/recv.
use crate::comm::Communicator;
use crate::layers::module::Activations;
use candle_core::{bail, DType, Device, Result, Tensor};

fn code(dtype: DType) -> Result<i64> {
    Ok(match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::U32 => 3,
        DType::F64 => 4,
        other => bail!("pipeline send: {other:?} tensors are not carried"),
    })
}

fn dtype(code: i64) -> Result<DType> {
    Ok(match code {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::BF16,
        3 => DType::U32,
        4 => DType::F64,
        other => bail!("pipeline recv: unknown element code {other}"),
    })
}

/// Sends `a` (hidden state and auxiliary tensors) to rank `dst`.
pub fn send_activations(
    comm: &dyn Communicator,
    dst: usize,
    tag: u64,
    a: &Activations,
) -> Result<()> {
    let tensors: Vec<&Tensor> = std::iter::once(&a.hidden).chain(&a.aux).collect();
    let mut header = vec![tensors.len() as i64];
    for t in &tensors {
        header.push(code(t.dtype())?);
        header.push(t.rank() as i64);
        header.extend(t.dims().iter().map(|d| *d as i64));
    }
    comm.send(dst, tag, &[header.len() as i64])?;
    comm.send(dst, tag, &header)?;
    for t in tensors {
        comm.send_tensor(dst, tag, t)?;
    }
    Ok(())
}

/// Receives what [`send_activations`] sent from rank `src`.
pub fn recv_activations(
    comm: &dyn Communicator,
    src: usize,
    tag: u64,
    dev: &Device,
) -> Result<Activations> {
    let mut len = [0i64];
    comm.recv(src, tag, &mut len)?;
    if len[0] <= 0 || len[0] > 1 << 16 {
        bail!(
            "pipeline recv from rank {src}: bad header length {}",
            len[0]
        )
    }
    let mut header = vec![0i64; len[0] as usize];
    comm.recv(src, tag, &mut header)?;
    let mut at = 1;
    let mut tensors = Vec::new();
    for _ in 0..header[0].max(0) {
        let dt = dtype(*header.get(at).unwrap_or(&-1))?;
        let rank = (*header.get(at + 1).unwrap_or(&0)).clamp(0, 8) as usize;
        let Some(dims) = header.get(at + 2..at + 2 + rank) else {
            bail!("pipeline recv from rank {src}: truncated header")
        };
        let shape: Vec<usize> = dims.iter().map(|d| (*d).max(0) as usize).collect();
        at += 2 + rank;
        tensors.push(comm.recv_tensor(src, tag, &shape, dt, dev)?);
    }
    let mut it = tensors.into_iter();
    let Some(hidden) = it.next() else {
        bail!("pipeline recv from rank {src}: no tensors")
    };
    Ok(Activations::with_aux(hidden, it.collect()))
}

/// Sends the gradients of the float tensors of a received activation (zeros where none flowed).
pub fn send_grads(
    comm: &dyn Communicator,
    dst: usize,
    tag: u64,
    input: &[Tensor],
    grads: &[Option<Tensor>],
) -> Result<()> {
    for (i, t) in input
        .iter()
        .enumerate()
        .filter(|(_, t)| t.dtype().is_float())
    {
        match grads.get(i).and_then(|g| g.as_ref()) {
            Some(g) => comm.send_tensor(dst, tag, g)?,
            None => comm.send_tensor(dst, tag, &t.zeros_like()?)?,
        }
    }
    Ok(())
}

/// Receives the gradients of the float tensors of a sent activation (None for the others).
pub fn recv_grads(
    comm: &dyn Communicator,
    src: usize,
    tag: u64,
    output: &[Tensor],
) -> Result<Vec<Option<Tensor>>> {
    output
        .iter()
        .map(|t| {
            if t.dtype().is_float() {
                Ok(Some(comm.recv_tensor(
                    src,
                    tag,
                    t.dims(),
                    t.dtype(),
                    t.device(),
                )?))
            } else {
                Ok(None)
            }
        })
        .collect()
}
