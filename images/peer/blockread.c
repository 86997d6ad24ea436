/*
 * blockread - read a block device the plainest way Linux offers: pread() with
 * O_DIRECT, one request at a time, through the kernel's own driver. The peer
 * baseline of `hwharness bench ahci --peer linux` (no fio in a busybox guest).
 *
 *   blockread DEVICE rand4k COUNT SEED   COUNT random 4 KiB-aligned 4 KiB reads
 *   blockread DEVICE seq128k COUNT       COUNT 128 KiB reads from offset 0
 *
 * Prints "read N bytes B in T ns" (the guest's CLOCK_MONOTONIC; the host times
 * the whole command too). Exits 1 on any short or failed read.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static uint64_t xorshift(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

int main(int argc, char **argv)
{
    if (argc < 4 || (strcmp(argv[2], "rand4k") && strcmp(argv[2], "seq128k"))) {
        fprintf(stderr, "usage: blockread DEVICE rand4k|seq128k COUNT [SEED]\n");
        return 2;
    }
    int random = !strcmp(argv[2], "rand4k");
    long count = atol(argv[3]);
    uint64_t seed = argc > 4 ? strtoull(argv[4], NULL, 0) | 1 : 1;
    size_t size = random ? 4096 : 128 << 10;
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    uint64_t bytes = 0;
    if (fd < 0 || ioctl(fd, BLKGETSIZE64, &bytes) < 0) {
        perror(argv[1]);
        return 1;
    }
    void *buffer;
    if (posix_memalign(&buffer, 4096, size))
        return 1;
    uint64_t blocks = bytes / 4096 - 1, start = now_ns();
    for (long i = 0; i < count; i++) {
        off_t offset = random ? (off_t)(xorshift(&seed) % blocks) * 4096 : (off_t)i * (off_t)size;
        if (pread(fd, buffer, size, offset) != (ssize_t)size) {
            perror("pread");
            return 1;
        }
    }
    printf("read %ld bytes %lu in %lu ns\n", count, (unsigned long)(count * size), (unsigned long)(now_ns() - start));
    return 0;
}
