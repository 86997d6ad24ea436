/* kernel.c - entry, serial console, panic, TSC calibration. */
#include <stdarg.h>
#include "kernel.h"
#include "vectors.h"

_Static_assert(sizeof(struct proxy_shared) <= PROXY_DMA_OFFSET, "control area overlaps the DMA pool");
_Static_assert(sizeof(struct proxy_request) == 64, "a request is one cache line");
_Static_assert(PROXY_MAX_CHANNELS == 8 && __builtin_offsetof(struct proxy_shared, ring_posted) % 8 == 0,
               "the guest reads every ring's posted flag as one aligned word");

#define COM1 0x3f8
#define IVSHMEM_VENDOR 0x1af4
#define IVSHMEM_DEVICE 0x1110

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

/* Count TSC ticks across 10 ms of PIT channel 2 (1.193182 MHz), gate via port 0x61. */
static u64 calibrate_tsc(void)
{
    const u32 pit_ticks = 11932;
    outb(0x61, (inb(0x61) & ~0x02) | 0x01);   /* gate on, speaker off */
    outb(0x43, 0xb0);                         /* channel 2, lobyte/hibyte, mode 0 */
    outb(0x42, pit_ticks & 0xff);
    outb(0x42, pit_ticks >> 8);
    u64 start = rdtsc();
    while (!(inb(0x61) & 0x20))
        ;
    u64 end = rdtsc();
    return (end - start) * 1193182ull / pit_ticks;
}

static const struct proxy_pci_device *find_ivshmem(int n)
{
    for (int i = 0; i < n; i++)
        if (devices[i].vendor == IVSHMEM_VENDOR && devices[i].device == IVSHMEM_DEVICE)
            return &devices[i];
    return NULL;
}

void kmain(void)
{
    serial_init();
    kprintf("proxy: booting, abi %u\n", PROXY_ABI_VERSION);
    trap_init();
    tsc_hz = calibrate_tsc();
    kprintf("proxy: tsc %lu kHz\n", tsc_hz / 1000);

    int n = pci_enumerate(devices, PROXY_MAX_DEVICES);
    kprintf("proxy: %d pci functions\n", n);
    const struct proxy_pci_device *ivshmem = find_ivshmem(n);
    if (!ivshmem)
        panic("kmain: no ivshmem-doorbell device");
    const struct proxy_bar *bar2 = &ivshmem->bars[2];
    if (bar2->base == 0 || bar2->base + bar2->size > 0x100000000ull)
        panic("kmain: ivshmem BAR2 unassigned or above 4 GiB");
    if (bar2->size < PROXY_DMA_OFFSET)
        panic("kmain: ivshmem window smaller than the control area");

    struct proxy_shared *window = (struct proxy_shared *)(unsigned long)bar2->base;
    memcpy(window->devices, devices, sizeof(devices));
    window->ndevices = (u32)n;
    irq_init();
    iommu_init();
    if (pci_enable_msix(ivshmem, 0, VEC_KICK))
        panic("kmain: ivshmem has no MSI-X capability");
    proxy_init(window, devices, n, ivshmem);
    kprintf("proxy: ready, window %lx size %lx\n", bar2->base, bar2->size);
    proxy_loop();
}
