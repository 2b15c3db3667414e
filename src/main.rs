// burn's flex backend allocates a fresh buffer for nearly every tensor op; with glibc's malloc
// large buffers come straight from mmap and every step pays page faults and zeroing for them.
// mimalloc keeps freed pages for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(kiln::cli::main());
}
