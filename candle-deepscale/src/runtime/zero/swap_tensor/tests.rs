//! The swapper's unit tests: values round-trip through eviction, torn or stale blocks are
//! errors, an exhausted pool errs instead of hanging, overwrites read nothing.
use super::*;

/// Reads ahead never wait for a buffer (they are skipped when none is free), and a swap
/// that needs one while every buffer stays held ends in an error naming the setting to
/// raise instead of hanging.
#[test]
fn an_exhausted_pool_skips_reads_ahead_and_errs_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let block = 1024;
    let pool = BufferPool::with_wait(2, slot_bytes(block), std::time::Duration::from_millis(50));
    let mk = |name| {
        SwappedBuffer::new(
            dir.path(),
            name,
            4 * block,
            block,
            1,
            pool.clone(),
            IoThreads::new(1),
        )
        .unwrap()
    };
    let (a, b) = (mk("a"), mk("b"));
    let ones = |_: usize, d: &mut [f32]| d.iter_mut().for_each(|x| *x = 1.0);
    a.update_range(0..4 * block, ones).unwrap();
    a.flush().unwrap();
    // b holds one buffer resident, a's read ahead takes the other: the pool is empty.
    b.update_range(0..block, ones).unwrap();
    a.prefetch(1).unwrap();
    assert!(pool.try_take().is_none());
    a.prefetch(2).unwrap(); // skipped, not waiting
                            // a needs block 3 (not read ahead) while its read ahead of block 1 and b's resident
                            // block hold both buffers.
    let mut out = vec![0f32; block];
    let err = a
        .read_range(3 * block..4 * block, &mut out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("buffer_count"), "{err}");
    // Consuming the read ahead frees it again.
    a.read_range(block..2 * block, &mut out).unwrap();
    assert!(out.iter().all(|&x| x == 1.0));
}

fn buffer(dir: &Path, len: usize, block: usize, resident: usize) -> SwappedBuffer {
    let pool = BufferPool::new(4, slot_bytes(block));
    SwappedBuffer::new(dir, "t", len, block, resident, pool, IoThreads::new(2)).unwrap()
}

#[test]
fn values_survive_eviction_and_read_back_exactly() {
    // Both I/O engines: io_uring (where this kernel and sandbox allow it) and threads.
    for io in [IoThreads::with_aio(8, 1), IoThreads::new(2)] {
        let dir = tempfile::tempdir().unwrap();
        let pool = BufferPool::new(4, slot_bytes(1000));
        let b = SwappedBuffer::new(dir.path(), "t", 10_000, 1000, 2, pool, io.clone()).unwrap();
        round_trip(&b);
        use std::sync::atomic::Ordering::Relaxed;
        assert!(io.stats.written.load(Relaxed) > 0, "{}", io.backend);
    }
}

#[test]
fn an_overwritten_block_is_written_without_a_read_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let io = IoThreads::new(2);
    let pool = BufferPool::new(4, slot_bytes(1000));
    let b = SwappedBuffer::new(dir.path(), "t", 2500, 1000, 1, pool, io).unwrap();
    b.update_range(0..2500, |o, c| {
        c.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (o + i) as f32)
    })
    .unwrap();
    b.flush().unwrap();
    // Block 1 resident (read once), block 2 read ahead and dropped, block 0 on disk only.
    let mut one = [0f32; 1];
    b.read_range(1500..1501, &mut one).unwrap();
    b.prefetch(2).unwrap();
    let reads = b.io_bytes().0;
    let fill =
        |blk: usize, n: usize| -> Vec<f32> { (0..n).map(|i| -((blk * 1000 + i) as f32)).collect() };
    for (blk, n) in [(0, 1000), (1, 1000), (2, 500)] {
        b.overwrite_block(blk, &fill(blk, n)).unwrap();
    }
    assert_eq!(b.io_bytes().0, reads, "an overwrite reads nothing");
    assert!(
        b.overwrite_block(0, &[1.0; 999]).is_err(),
        "a short block is refused"
    );
    b.flush().unwrap();
    let mut all = vec![0f32; 2500];
    b.read_range(0..2500, &mut all).unwrap();
    assert!(all.iter().enumerate().all(|(i, x)| *x == -(i as f32)));
}

fn round_trip(b: &SwappedBuffer) {
    b.update_range(0..10_000, |o, c| {
        c.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (o + i) as f32 * 0.5)
    })
    .unwrap();
    b.flush().unwrap();
    let mut out = vec![0f32; 3000];
    b.read_range(4500..7500, &mut out).unwrap();
    assert!(out
        .iter()
        .enumerate()
        .all(|(i, x)| *x == (4500 + i) as f32 * 0.5));
    b.zero().unwrap();
    b.read_range(4500..7500, &mut out).unwrap();
    assert!(out.iter().all(|x| *x == 0.0));
}

#[test]
fn a_torn_or_stale_block_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let b = buffer(dir.path(), 4000, 1000, 1);
    b.update_range(0..4000, |_, c| c.iter_mut().for_each(|x| *x = 1.0))
        .unwrap();
    b.flush().unwrap();
    let path = b.path().to_path_buf();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // A crash mid-write: half of block 1's payload never reached the disk.
    let slot = slot_bytes(1000) as u64;
    f.write_all_at(&[0u8; 1000], slot + HEADER as u64 + 1000)
        .unwrap();
    let mut out = vec![0f32; 10];
    let e = b.read_range(1000..1010, &mut out).unwrap_err().to_string();
    assert!(e.contains("checksum") && e.contains("t.swp"), "{e}");
    // A stale block: block 2 as an older write left it (its generation behind).
    let mut old = vec![0u8; slot as usize];
    f.sync_all().unwrap();
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut old, 2 * slot)
        .unwrap();
    b.update_range(2000..2010, |_, c| c.iter_mut().for_each(|x| *x = 3.0))
        .unwrap();
    b.flush().unwrap();
    f.write_all_at(&old, 2 * slot).unwrap();
    let e = b.read_range(2000..2010, &mut out).unwrap_err().to_string();
    assert!(e.contains("generation"), "{e}");
}
