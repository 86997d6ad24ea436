/* kernel.c - entry, serial console, panic, TSC calibration. */
#include <stdarg.h>
#include "kernel.h"
#include "vectors.h"

_Static_assert(sizeof(struct proxy_shared) <= PROXY_DMA_OFFSET, "control area overlaps the DMA pool");
_Static_assert(sizeof(struct proxy_request) == 64, "a request is one cache line");
_Static_assert(__builtin_offsetof(struct proxy_ring, entries) % 64 == 0,
               "each entry is a cache line of its own: publishing one moves only that line");
_Static_assert(__builtin_offsetof(struct proxy_request, published) % 8 == 0
               && __builtin_offsetof(struct proxy_request, count) == __builtin_offsetof(struct proxy_request, published) + 4,
               "a publication is one aligned 8-byte word: published, then count");
_Static_assert(PROXY_TOTAL_CHANNELS == PROXY_MAX_CHANNELS + PROXY_MAX_SLOTS * PROXY_SLOT_CHANNELS
               && PROXY_SLOT_CHANNELS <= PROXY_MAX_CHANNELS && PROXY_TOTAL_CHANNELS <= 32,
               "channels are numbered across windows, and an IOAPIC line's owners are bits of a word");

#define COM1 0x3f8

u64 tsc_hz;
static struct proxy_pci_device devices[PROXY_MAX_DEVICES];

void *memset(void *d, int c, unsigned n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

/* Word at a time when both ends allow it: a ring entry is copied per request. */
void *memcpy(void *d, const void *s, unsigned n)
{
    u8 *p = d;
    const u8 *q = s;
    if ((((unsigned long)p | (unsigned long)q | n) & 3) == 0) {
        for (unsigned i = 0; i < n / 4; i++)
            ((u32 *)p)[i] = ((const u32 *)q)[i];
        return d;
    }
    while (n--)
        *p++ = *q++;
    return d;
}

static void serial_init(void)
{
    outb(COM1 + 1, 0x00);       /* no UART interrupts */
    outb(COM1 + 3, 0x80);       /* DLAB on */
    outb(COM1 + 0, 0x01);       /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);       /* 8N1 */
}

static void serial_putc(char c)
{
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
        pause();
    outb(COM1, (u8)c);
}

static void put_num(u64 v, unsigned base, int width)
{
    char buf[24];
    int n = 0;
    do {
        buf[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (n < width)
        buf[n++] = '0';
    while (n)
        serial_putc(buf[--n]);
}

/* Enough printf for boot messages: %s %c %d %u %x %lx (64-bit) and a width digit. */
void kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            if (*fmt == '\n')
                serial_putc('\r');
            serial_putc(*fmt);
            continue;
        }
        int width = 0, is64 = 0;
        fmt++;
        if (*fmt >= '0' && *fmt <= '9')
            width = *fmt++ - '0';
        if (*fmt == 'l') {
            is64 = 1;
            fmt++;
        }
        u64 v = 0;
        if (*fmt == 'd' || *fmt == 'u' || *fmt == 'x')
            v = is64 ? va_arg(ap, u64) : va_arg(ap, u32);
        switch (*fmt) {
        case 's':
            for (const char *s = va_arg(ap, const char *); *s; s++)
                serial_putc(*s);
            break;
        case 'c':
            serial_putc((char)va_arg(ap, int));
            break;
        case 'd':
            if (!is64 && (int)v < 0) {
                serial_putc('-');
                v = (u32)-(int)v;
            }
            put_num(v, 10, width);
            break;
        case 'u':
            put_num(v, 10, width);
            break;
        case 'x':
            put_num(v, 16, width);
            break;
        default:
            serial_putc(*fmt);
        }
    }
    va_end(ap);
}

void panic(const char *msg)
{
    crash(NULL, msg);
}

/*
 * The TSC's rate, against PIT channel 2 (1.193182 MHz). Each reading pairs the
 * PIT's latched count with the TSC on either side of it, so a vCPU that is
 * descheduled mid-measurement (the host here is shared and busy) spoils only
 * the readings it falls into: a span whose two brackets together are wider
 * than 1% of it is thrown away. (Waiting for the PIT's output bit instead, as
 * before, counted every stall as TSC ticks: rates 8-137% too high, and with
 * them poll deadlines and the idle spin too long, or too short.)
 *
 * A stall between the two readings costs nothing, so the boot's span runs
 * across the boot's other work (PCI, the IOMMU: 30-60 ms under TCG) rather
 * than in a wait of its own, stretched to 10 ms where that work was quicker.
 * The count is 16 bits, 55 ms: when it went round (OUT high), a short span's
 * rough rate says how many times, and the long span must agree with it within
 * 1%. Only when the boot's span is not clean does the boot measure again: the
 * median of three clean spans of 10 ms.
 */
#define PIT_HZ 1193182ull
#define PIT_SPAN 11932u                         /* 10 ms of PIT ticks */
#define PIT_ROUGH_SPAN 2386u                    /* 2 ms: enough to count the long span's wraps */
#define PIT_WRAP 65536ull
#define PIT_OUT2 0x20                           /* port 0x61: channel 2's output, high once the count reached 0 */

/* A span's start (the PIT's count and the TSC beside it), then its length in both. */
struct pit_span {
    u64 tsc, bracket;                           /* bracket: the readings' widths, in TSC ticks */
    u16 count;
    u64 ticks, pit;                             /* pit: modulo PIT_WRAP when wrapped */
    int wrapped;
};

/* The PIT channel 2 count, with the TSC at the middle of reading it; returns the bracket's width. */
static u64 pit_reading(u64 *tsc, u16 *count)
{
    u64 before = rdtsc();
    outb(0x43, 0x80);                           /* latch channel 2 */
    u8 lo = inb(0x42), hi = inb(0x42);
    u64 after = rdtsc();
    *tsc = before + (after - before) / 2;
    *count = (u16)(lo | hi << 8);
    return after - before;
}

static int pit_wrapped(void)
{
    return inb(0x61) & PIT_OUT2;
}

/* Start channel 2 counting down from its top (mode 0: OUT low until the count reaches 0) and read it. */
static void span_start(struct pit_span *s)
{
    outb(0x61, (inb(0x61) & ~0x02) | 0x01);   /* gate on, speaker off */
    outb(0x43, 0xb0);                         /* channel 2, lobyte/hibyte, mode 0: counts down */
    outb(0x42, 0xff);
    outb(0x42, 0xff);
    s->bracket = pit_reading(&s->tsc, &s->count);
}

/* End the span once it is `least` PIT ticks long (or the count wrapped). */
static void span_end(struct pit_span *s, u16 least)
{
    u64 tsc, width;
    u16 count;
    do
        width = pit_reading(&tsc, &count);
    while ((u16)(s->count - count) < least && !pit_wrapped());
    s->bracket += width;
    s->wrapped = pit_wrapped();               /* read after the count: a late wrap is counted, not missed */
    s->ticks = tsc - s->tsc;
    s->pit = (u16)(s->count - count);
}

/* The span's rate; 0 unless it is clean (its brackets narrow, its count not wrapped). */
static u64 span_rate(const struct pit_span *s)
{
    if (s->wrapped || s->bracket * 100 >= s->ticks || !s->pit)
        return 0;
    return s->ticks * PIT_HZ / s->pit;
}

/* A short span's rate, to count a long span's wraps with; 0 when three tries were not clean. */
static u64 rough_rate(void)
{
    u64 rate = 0;
    for (int attempt = 0; attempt < 3 && !rate; attempt++) {
        struct pit_span s;
        span_start(&s);
        span_end(&s, PIT_ROUGH_SPAN);
        rate = span_rate(&s);
    }
    return rate;
}

/* The rate over `boot`, a span started before the boot's other work, or measured again. */
static u64 calibrate_tsc(struct pit_span *boot)
{
    span_end(boot, PIT_SPAN);
    if (boot->wrapped) {
        u64 rough_hz = rough_rate();
        u64 expected = rough_hz ? boot->ticks * PIT_HZ / rough_hz : 0;     /* PIT ticks, within 1% */
        if (expected + PIT_WRAP / 2 > boot->pit) {
            boot->pit += (expected + PIT_WRAP / 2 - boot->pit) / PIT_WRAP * PIT_WRAP;
            boot->wrapped = 0;
            u64 rate = span_rate(boot);
            if (rate && (rate > rough_hz ? rate - rough_hz : rough_hz - rate) * 100 < rough_hz)
                return rate;
        }
    } else if (span_rate(boot)) {
        return span_rate(boot);
    }
    u64 good[3], fallback = 0, widest = ~0ull;
    unsigned n = 0;
    for (int attempt = 0; attempt < 12 && n < 3; attempt++) {
        struct pit_span s;
        span_start(&s);
        span_end(&s, PIT_SPAN);
        u64 rate = span_rate(&s);
        if (rate)
            good[n++] = rate;
        else if (!s.wrapped && s.bracket < widest)
            widest = s.bracket, fallback = s.ticks * PIT_HZ / s.pit;
    }
    if (n < 3)                                  /* a host too busy for three clean spans: the best we saw */
        return n ? good[0] : fallback;
    u64 lo = good[0] < good[1] ? good[0] : good[1], hi = good[0] < good[1] ? good[1] : good[0];
    return good[2] < lo ? lo : good[2] > hi ? hi : good[2];    /* the median */
}

/*
 * A 4 KiB alias of the page at `phys`, at TLB index `index` of TCG's TLB (256 entries,
 * indexed by virtual page number: abi.h): virtual 4 GiB + index * 4 KiB, uncached. The
 * LAPIC and the IOAPIC live at index 0, as does the first page of every large BAR,
 * where most device registers are; reached through aliases they cost a victim-TLB swap
 * neither each other nor a device. Boot is single-threaded and the aliased range was
 * never mapped, so no TLB holds a stale entry for it.
 */
extern u64 pdpt[512];
static u64 alias_pd[512] __attribute__((aligned(4096)));
static u64 alias_pt[512] __attribute__((aligned(4096)));

u64 map_alias(u32 index, u64 phys)
{
    const u64 present_writable_uncached = 0x1b;
    u32 page = index % 256;                     /* one TLB's worth of indexes */
    if (!pdpt[4]) {
        alias_pd[0] = (u64)alias_pt | 3;
        pdpt[4] = (u64)alias_pd | 3;
    }
    alias_pt[page] = phys | present_writable_uncached;
    return 0x100000000ull + (u64)page * 4096;
}

void kmain(void)
{
    serial_init();
    kprintf("proxy: booting, abi %u\n", PROXY_ABI_VERSION);
    trap_init();
    struct pit_span boot;
    span_start(&boot);                          /* measured across the work up to proxy_init */
    /*
     * The IOMMU before the BARs: turning translation on switches every device's DMA
     * address space, and QEMU rebuilds its memory maps for each; with no BAR mapped yet
     * they are smaller (under TCG, 8 boots each way: 20 ms instead of 30).
     */
    iommu_init();
    int n = pci_enumerate(devices, PROXY_MAX_DEVICES);
    kprintf("proxy: %d pci functions\n", n);
    irq_init();
    tsc_hz = calibrate_tsc(&boot);              /* proxy_init publishes it; nothing before uses it */
    kprintf("proxy: tsc %lu kHz\n", tsc_hz / 1000);
    proxy_init(devices, n);
    proxy_loop();
}
