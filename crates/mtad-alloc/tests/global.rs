//! `BlockCache` as the global allocator of a whole program, as the binaries install it: large
//! vectors (ours) and small ones (the system's) are allocated, grown, shrunk and freed from
//! several threads, with their contents intact.

use mtad_alloc::BlockCache;

#[global_allocator]
static ALLOCATOR: BlockCache = BlockCache::new();

#[test]
fn large_and_small_vectors_keep_their_contents_across_threads() {
    std::thread::scope(|scope| {
        for t in 0..4u32 {
            scope.spawn(move || {
                for round in 0..8u32 {
                    let seed = t * 1000 + round;
                    // 1 MiB to 24 MiB of u32s: blocks of several size classes, freed and reused.
                    let len = (1 << 18) * (1 + (seed as usize % 24));
                    let mut large: Vec<u32> = (0..len as u32).map(|i| i ^ seed).collect();
                    let small: Vec<u32> = vec![seed; 100];
                    large.extend(0..(len / 2) as u32);
                    assert!(
                        large[..len]
                            .iter()
                            .enumerate()
                            .all(|(i, v)| *v == i as u32 ^ seed)
                    );
                    assert!(large[len..].iter().enumerate().all(|(i, v)| *v == i as u32));
                    large.truncate(len / 3);
                    large.shrink_to_fit();
                    assert!(large.iter().enumerate().all(|(i, v)| *v == i as u32 ^ seed));
                    let zeroed = vec![0u8; len];
                    assert!(
                        zeroed.iter().all(|v| *v == 0),
                        "a reused block was not zeroed"
                    );
                    assert!(small.iter().all(|v| *v == seed));
                }
            });
        }
    });
}
