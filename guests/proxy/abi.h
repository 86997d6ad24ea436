/*
 * abi.h - the shared-memory ABI between the proxy guest and the host harness.
 *
 * This header is the single source of truth for the layout of the ivshmem
 * shared window (BAR2). The host never types an offset: it reads the
 * structures and enumerations below from the built guest ELF's DWARF
 * (harness/proxy/abi.py). So constants are enumerators, not #defines,
 * and every type here is emitted into the debug info.
 *
 * Window layout (offsets from the start of BAR2):
 *   0                       struct proxy_shared: its header, the devices,
 *   PROXY_HOT_OFFSET          then what every request touches: hot[], rings[]
 *   PROXY_DMA_OFFSET        DMA pool, to the end of the window
 *
 * Where the hot part lies is chosen for TCG. Its softmmu TLB is direct-mapped
 * by virtual page number, 256 entries here (QEMU resizes it only when the
 * guest flushes it, which the proxy never does after boot). Every BAR aligned
 * to 1 MiB or more has its first page, where most registers are, at index 0,
 * as have the LAPIC and the IOAPIC; a window's first page is there too. A
 * page the proxy touched in every request at the same index as a device's
 * register cost each MMIO access 0.12 us more (1.37 against 1.25 us an e1000
 * STATUS read, ABI 12), two victim-TLB swaps. So nothing in a window's first
 * 256 KiB is touched per request or interrupt: each window's host_sleeping,
 * interrupt counters and DMA fault records are in its own page, hot[p] for
 * window p, and channel c's ring is rings[c] in the window that holds it, so
 * no two windows' hot pages share an index either (page indexes 0x40-0xa5).
 * The guest kernel's own hot pages are linked at 0xc0-0xef (link.ld).
 *
 * A machine has one control window, held by the process that owns the
 * machine, and up to PROXY_MAX_SLOTS driver slots: ivshmem devices of their
 * own with the same layout, each handed to one driver process. A slot's
 * channels use its rings 0..PROXY_SLOT_CHANNELS-1 (channel c's ring is
 * rings[c] of the window: the hot part, below) and its devices' DMA
 * domains lie in its own pool; only the control window's channel 0 may open
 * and close channels (in any window). The proxy looks at a slot window only
 * while one of its channels is open: until then its rings go unserved and its
 * guest_sleeping stays 0. Before boot the host writes each slot's number into
 * its `slot` field; the control window's is 0.
 *
 * A ring is single-producer (host) single-consumer (guest). Entry `seq` (a count
 * modulo 2**32) lives in entries[seq % PROXY_RING_ENTRIES]. The host fills
 * entries, then publishes them, `count` entries from seq on, with one 8-byte
 * store into the first one: its `published` (~(seq / PROXY_RING_ENTRIES), the
 * bitwise NOT of the entry's lap of the ring, so neither zeroed memory nor the
 * slot's last lap reads as published) and `count`. The guest watches the next
 * entry of each open channel's ring, executes what is published in order, writes
 * status, value and tsc back into each entry, then advances the ring's `served`
 * (in steps, when a batch outlasts its turn: PROXY_TURN_US). A request so costs
 * the two processors one cache line each way, the entry's (ABI 12; a ring-wide
 * `submit` index and a window-wide `ring_posted` flag word cost two more). A
 * batch is the entries of one publication; once one of them fails, the rest of
 * that batch is SKIPPED, so a driver never acts on a failed step. A count
 * outside 1..PROXY_RING_ENTRIES publishes its first entry alone, BAD_REQUEST.
 *
 * Several batches may be in flight on one ring (ABI 11): the host publishes
 * batch after batch without waiting, and the guest may find several of them
 * published one after another. So the host writes PROXY_STATUS_CONTINUES into the
 * status of every entry of a batch but its first: an entry without it starts
 * a batch, and a failure skips the rest of its own batch, never the next one.
 * (A single request, the hot path, writes status 0 as it always did.) A host
 * may post a batch (a doorbell, a tail pointer) and never wait for it: it
 * learns of the batch's failure from the batch's own entries, which stay in
 * the ring until it publishes PROXY_RING_ENTRIES further on, and reports it on
 * its next waited request (harness/proxy/channel.py).
 */
#ifndef PROXY_ABI_H
#define PROXY_ABI_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
/* i386 aligns 64-bit fields to 4 bytes; the host reads them as naturally aligned words. */
typedef unsigned long long u64 __attribute__((aligned(8)));

enum proxy_abi {
    PROXY_ABI_MAGIC = 0x48574858,   /* "XHWH" little-endian */
    PROXY_ABI_VERSION = 14,         /* 14: guest_sleeping numbers each halt (one kick per halt) */
};

enum proxy_limits {
    PROXY_MAX_DEVICES = 32,
    PROXY_MAX_CHANNELS = 8,         /* rings of one window; the control window's channel 0 is the admin channel */
    PROXY_MAX_SLOTS = 4,            /* driver slots: windows of their own, one per driver process */
    PROXY_SLOT_CHANNELS = 4,        /* channels a driver slot serves: its rings 0..3 */
    PROXY_TOTAL_CHANNELS = 24,      /* PROXY_MAX_CHANNELS + PROXY_MAX_SLOTS * PROXY_SLOT_CHANNELS */
    PROXY_RING_ENTRIES = 256,       /* a power of two */
    PROXY_MAX_BARS = 6,
    PROXY_MAX_CAPS = 12,
    PROXY_ISA_MAX_PORTS = 64,       /* largest ISA port range one channel may hold */
    PROXY_POLL_MAX_US = 2000000,    /* longest guest-side poll */
    PROXY_TURN_US = 1000,           /* a ring's turn: a longer batch yields to the other rings, then goes on */
    PROXY_IDLE_SPIN_US = 200,       /* a ring's idle_spin_us when its channel opens */
    PROXY_IDLE_SPIN_MAX_US = 2000,  /* the most a ring may ask for */
    PROXY_REPEAT_MAX = 1000000,     /* longest native timing loop */
    PROXY_DMA_OFFSET = 0x100000,    /* DMA pool starts 1 MiB into the window */
    PROXY_HOT_OFFSET = 0x40000,     /* hot[] and rings[] start 256 KiB into it (TLB indexes, above) */
    PROXY_HOST_PEER = 0,            /* ivshmem peer id of the host harness */
    PROXY_IRQ_VECTORS = 4,          /* interrupt vectors one channel may take (MSI-X entries 0..3) */
    PROXY_DOORBELL_VECTORS = 40,    /* host doorbells: 0..7 ring c served, then one per channel vector */
    PROXY_DOORBELL_IRQ_BASE = 8,    /* channel c's vector v rings 8 + c * PROXY_IRQ_VECTORS + v */
    PROXY_NO_GSI = 0xff,
    PROXY_CRASH_MAGIC = 0x0dead,    /* OP_CRASH needs this value: no accidents */
    PROXY_NVME_MAX_QUEUES = 2,      /* queue pairs one native NVMe loop drives at once */
    PROXY_NVME_MAX_DEPTH = 64,      /* commands in flight per queue in that loop */
    PROXY_DOMAIN_ALIGN = 0x1000,    /* a DMA domain is whole pages of the pool */
    PROXY_DOMAIN_MAX = 0x1000000,   /* and at most 16 MiB */
    PROXY_NIC_SINK_BYTES = 16384,   /* the native receive loop's copy target (struct proxy_nic_loop) */
    PROXY_NIC_FORWARD_BATCH = 256,  /* most frames a native forwarding loop takes from a ring at a time */
    PROXY_READONLY_CONFIG_FIELDS = 5,   /* entries of proxy_readonly_config[] */
};

/*
 * PCI configuration space (PCI Local Bus 3.0, 6.2 and 6.7-6.8): the registers and
 * bits that both the proxy and the host's qtest transport use, written down once.
 */
enum proxy_pci {
    PROXY_PCI_COMMAND = 0x04,
    PROXY_PCI_COMMAND_IO = 0x1,             /* I/O space decode */
    PROXY_PCI_COMMAND_MEMORY = 0x2,         /* memory space decode */
    PROXY_PCI_COMMAND_MASTER = 0x4,         /* bus mastering: the device may DMA */
    PROXY_PCI_COMMAND_INTX_DISABLE = 0x400,
    PROXY_PCI_STATUS = 0x06,
    PROXY_PCI_STATUS_CAP_LIST = 0x10,       /* the capability list at PROXY_PCI_CAP_PTR is valid */
    PROXY_PCI_CLASS_REVISION = 0x08,        /* class, subclass, prog-if, revision: one dword */
    PROXY_PCI_CLASS_BRIDGE = 0x06,          /* host, ISA and PCI bridges: their registers route the machine */
    PROXY_PCI_HEADER_TYPE = 0x0e,
    PROXY_PCI_HEADER_LAYOUT = 0x7f,         /* of the header type: which layout follows */
    PROXY_PCI_HEADER_MULTI_FUNCTION = 0x80, /* of function 0's header type: functions 1-7 may exist */
    PROXY_PCI_HEADER_NORMAL = 0,
    PROXY_PCI_HEADER_BRIDGE = 1,
    PROXY_PCI_BAR0 = 0x10,                  /* six BARs in a normal header, two in a bridge's */
    PROXY_PCI_SECONDARY_BUS = 0x19,         /* a bridge's */
    PROXY_PCI_CAP_PTR = 0x34,
    PROXY_PCI_INTERRUPT_LINE = 0x3c,
    PROXY_PCI_INTERRUPT_PIN = 0x3d,
    PROXY_PCI_CAP_ID_MSI = 0x05,
    PROXY_PCI_CAP_ID_MSIX = 0x11,
    PROXY_PCI_MSIX_FLAGS = 2,               /* offset in the MSI-X capability */
    PROXY_PCI_MSIX_FLAGS_QSIZE = 0x7ff,     /* table entries - 1 */
    PROXY_PCI_MSIX_TABLE = 4,               /* offset in the MSI-X capability: BIR | offset in that BAR */
    PROXY_PCI_MSIX_TABLE_BIR = 0x7,
    PROXY_PCI_MSIX_ENTRY_SIZE = 16,
};

/*
 * Config-space fields a channel may read but never write, whatever its grants:
 * they say where the device decodes (BARs, expansion ROM) and where its MSI
 * goes (an MSI is a DMA write). With `cap` 0 a field is `offset` bytes into
 * a header of layout `header` (a bridge's, or any other); otherwise it is
 * `offset` bytes into every capability `cap`. The proxy enforces this table
 * and the host's qtest transport reads it from the ELF (.rodata), so both
 * refuse the same writes. The MSI-X table (in a BAR) is read-only too: both
 * derive it from the capability.
 */
struct proxy_config_field {
    u8 header;                      /* PROXY_PCI_HEADER_BRIDGE or _NORMAL (any other layout); unused with cap */
    u8 cap;                         /* 0, or the capability ID the offset is in */
    u8 offset;
    u8 size;
};

/* Defined once, in the file that defines PROXY_ABI_TABLES (proxy.c); declared everywhere else. */
#ifdef PROXY_ABI_TABLES
const struct proxy_config_field proxy_readonly_config[PROXY_READONLY_CONFIG_FIELDS] = {
    { PROXY_PCI_HEADER_NORMAL, 0, PROXY_PCI_BAR0, 24 },    /* BAR0-5 */
    { PROXY_PCI_HEADER_NORMAL, 0, 0x30, 4 },               /* expansion ROM */
    { PROXY_PCI_HEADER_BRIDGE, 0, PROXY_PCI_BAR0, 8 },     /* BAR0-1 */
    { PROXY_PCI_HEADER_BRIDGE, 0, 0x38, 4 },               /* expansion ROM */
    { 0, PROXY_PCI_CAP_ID_MSI, 4, 10 },                    /* message address (64-bit) and data */
};
#else
extern const struct proxy_config_field proxy_readonly_config[PROXY_READONLY_CONFIG_FIELDS];
#endif

/*
 * Ports no ISA channel may hold, whatever the host asks: their effects reach
 * beyond one device. Each is base << 16 | count; the host reads the names as
 * the reason it gives. On top of this the host grants only the ports of the
 * legacy devices its machine was built with (harness/machine/legacy.py).
 */
enum proxy_reserved_ports {
    PROXY_RESERVED_ISA_DMA_CONTROLLER_1 = 0x00 << 16 | 0x20,   /* a way around any IOMMU */
    PROXY_RESERVED_INTERRUPT_CONTROLLER_1 = 0x20 << 16 | 2,
    PROXY_RESERVED_INTERRUPT_ROUTING_IMCR = 0x22 << 16 | 2,
    PROXY_RESERVED_TIMER_THE_PROXY_USES = 0x40 << 16 | 4,
    PROXY_RESERVED_TIMER_GATE_AND_NMI_STATUS = 0x61 << 16 | 1,
    PROXY_RESERVED_ISA_DMA_PAGE_REGISTERS = 0x80 << 16 | 0x10,
    PROXY_RESERVED_FAST_A20_AND_RESET = 0x92 << 16 | 1,
    PROXY_RESERVED_INTERRUPT_CONTROLLER_2 = 0xa0 << 16 | 2,
    PROXY_RESERVED_APM_CONTROL_SMI = 0xb2 << 16 | 2,
    PROXY_RESERVED_ISA_DMA_CONTROLLER_2 = 0xc0 << 16 | 0x20,
    PROXY_RESERVED_THE_PROXY_CONSOLE = 0x3f8 << 16 | 8,
    PROXY_RESERVED_EDGE_LEVEL_CONTROL = 0x4d0 << 16 | 2,
    PROXY_RESERVED_FW_CFG_WHICH_CAN_DMA = 0x510 << 16 | 12,
    PROXY_RESERVED_ACPI_POWER_MANAGEMENT = 0x600 << 16 | 0x80,
    PROXY_RESERVED_PCI_CONFIGURATION_AND_RESET = 0xcf8 << 16 | 8,
};

enum proxy_state {
    PROXY_STATE_BOOTING = 0,        /* the window is all zeroes until the guest is up */
    PROXY_STATE_READY = 1,
    PROXY_STATE_CRASHED = 2,
};

enum proxy_op {
    PROXY_OP_NOP = 0,
    PROXY_OP_PIO_READ = 1,          /* addr = port */
    PROXY_OP_PIO_WRITE = 2,
    PROXY_OP_MMIO_READ = 3,         /* addr = guest-physical address */
    PROXY_OP_MMIO_WRITE = 4,
    PROXY_OP_CFG_READ = 5,          /* addr = offset in the device's config space */
    PROXY_OP_CFG_WRITE = 6,
    PROXY_OP_PIO_POLL = 7,          /* until (read & mask) == expect, or timeout_us */
    PROXY_OP_MMIO_POLL = 8,
    PROXY_OP_PIO_REPEAT = 9,        /* read value times; value := TSC cycles taken */
    PROXY_OP_MMIO_REPEAT = 10,
    PROXY_OP_PIO_POLL_CHANGE = 11,  /* until (read & mask) != expect, or timeout_us */
    PROXY_OP_MMIO_POLL_CHANGE = 12,
    PROXY_OP_DMA_POLL = 13,         /* addr = guest-physical, inside the DMA pool: memory a device writes */
    /* admin channel only */
    PROXY_OP_OPEN_PCI = 32,         /* addr = bus << 8 | dev << 3 | fn, value = DMA domain base (IOVA),
                                       mask = its size (0: none), expect = the window (0: control,
                                       n: slot n); value := the channel's ring in that window */
    PROXY_OP_OPEN_ISA = 33,         /* addr = first port, value = count | the ISA IRQs the channel may
                                       take (bit n: IRQ n) << 16, mask = bit n grants port addr + n
                                       (0: all of them), expect = the window; value := ring */
    PROXY_OP_CLOSE = 34,            /* addr = ring, expect = the window */
    PROXY_OP_CRASH = 35,            /* value = PROXY_CRASH_MAGIC, addr = enum proxy_crash_kind */
    PROXY_OP_SLOT_REVOKE = 36,      /* addr = slot: close every channel it holds */
    PROXY_OP_SLOT_READY = 37,       /* addr = slot: publish its control page again (after the host cleared it) */
    PROXY_OP_OPEN_PCI_SHARED = 38,  /* as OPEN_PCI, but the device DMAs in the domain of ring value of
                                       the same window (one driver's devices only, as a VFIO container):
                                       addr = bdf, expect = the window; value := the channel's ring */
    /* interrupts, on the channel's own device */
    PROXY_OP_IRQ_ENABLE = 40,       /* addr = enum proxy_irq_mode; value = ISA IRQ bitmask for PROXY_IRQ_ISA,
                                       vectors (1..PROXY_IRQ_VECTORS; 0 means 1) for MSI-X, and
                                       for MSI a power of two the device offers */
    PROXY_OP_IRQ_ACK = 41,          /* unmask a level line once every channel on it has acked */
    PROXY_OP_IRQ_DISABLE = 42,
    /* the in-guest baselines ("the in-kernel driver"); addr = a struct proxy_nic_loop in the DMA pool */
    PROXY_OP_NIC_TX_LOOP = 48,      /* value := TSC cycles taken */
    PROXY_OP_NIC_RX_LOOP = 49,
    PROXY_OP_DISK_READ_LOOP = 50,   /* addr = a struct proxy_disk_loop in the DMA pool */
    PROXY_OP_NVME_LOOP = 51,        /* addr = a struct proxy_nvme_loop in the DMA pool */
    PROXY_OP_NIC_FORWARD_LOOP = 52, /* addr = a struct proxy_nic_forward in the DMA pool */
};



enum proxy_irq_mode {
    PROXY_IRQ_NONE = 0,
    PROXY_IRQ_INTX = 1,             /* the PCI device's INTx line, level-triggered, shareable */
    PROXY_IRQ_MSI = 2,              /* the PCI device's MSI, 1, 2 or 4 messages, programmed by the proxy */
    PROXY_IRQ_ISA = 3,              /* ISA IRQs (edge), for an ISA channel: any of a bitmask */
    PROXY_IRQ_MSIX = 4,             /* the PCI device's MSI-X table entries 0..n-1, programmed by the proxy */
};

enum proxy_status {
    PROXY_STATUS_PENDING = 0,       /* not executed yet */
    PROXY_STATUS_OK = 1,
    PROXY_STATUS_DENIED = 2,        /* outside the channel's grants */
    PROXY_STATUS_BAD_REQUEST = 3,   /* malformed: op, width, alignment, range */
    PROXY_STATUS_TIMEOUT = 4,       /* a poll expired; value holds the last read */
    PROXY_STATUS_FAULT = 5,         /* the proxy could not carry it out */
    PROXY_STATUS_SKIPPED = 6,       /* not run: an earlier request of its batch failed */
    PROXY_STATUS_DMA_FAULT = 7,     /* not run: the channel's device made a DMA outside its domain
                                       since the channel's last request; see dma_faults[channel] */
    PROXY_STATUS_CONTINUES = 0x8000,    /* written by the host, in the entries of a batch after its
                                           first: they belong to the batch before them */
};

enum proxy_crash_kind {
    PROXY_CRASH_INVALID_OPCODE = 0,
    PROXY_CRASH_DIVIDE = 1,
    PROXY_CRASH_GPF = 2,
    PROXY_CRASH_PANIC = 3,
};

enum proxy_crash_vector {
    PROXY_VECTOR_PANIC = 256,       /* a panic() rather than a CPU exception */
};

struct proxy_request {
    u8 op;                          /* enum proxy_op */
    u8 width;                       /* 1, 2, 4 or 8 bytes */
    u16 status;                     /* enum proxy_status, written by the guest */
    u32 timeout_us;                 /* polls */
    u64 addr;
    u64 value;                      /* in: value to write; out: value read */
    u64 mask;                       /* polls */
    u64 expect;                     /* polls */
    u64 start_tsc;                  /* guest TSC just before the access was made */
    u32 published;                  /* host, a publication's first entry: ~(seq / PROXY_RING_ENTRIES), */
    u32 count;                      /* with the entries it publishes, in one 8-byte store after the rest */
    u64 reserved;
};

struct __attribute__((aligned(64))) proxy_ring {
    u32 idle_spin_us;               /* host (the guest sets PROXY_IDLE_SPIN_US when the channel opens): how
                                     * long the idle loop looks for more before it halts; it takes the longest
                                     * ask of the rings it served since it last halted */
    u32 pad0[15];                   /* host-written above, guest-written below: separate cache lines */
    u32 served;                     /* written by the guest only */
    u32 pad1[15];
    struct proxy_request entries[PROXY_RING_ENTRIES];
};

struct proxy_bar {
    u64 base;                       /* as the firmware assigned it; 0 if unused */
    u64 size;
    u8 is_io;
    u8 is_64;
    u8 prefetchable;
    u8 pad[5];
};

struct proxy_cap {
    u8 id;
    u8 offset;
};

struct proxy_pci_device {
    u8 bus, dev, fn, header_type;
    u16 vendor, device;
    u8 class_code, subclass, prog_if, revision;
    u8 irq_line, irq_pin, ncaps;
    u8 gsi;                         /* IOAPIC input of INTx on this machine, 0xff if unknown */
    struct proxy_bar bars[PROXY_MAX_BARS];
    struct proxy_cap caps[PROXY_MAX_CAPS];
};

struct proxy_crash {
    u32 vector;                     /* CPU exception vector, or PROXY_VECTOR_PANIC */
    u32 error_code;
    u64 rip, cs, rflags, rsp;
    u64 rax, rbx, rcx, rdx, rsi, rdi, rbp;
    u64 r8, r9, r10, r11, r12, r13, r14, r15;
    u64 cr0, cr2, cr3, cr4;
    u8 code[32];                    /* bytes at rip */
    u8 stack[64];                   /* bytes at rsp */
    char message[96];               /* panic() text, NUL-terminated */
};

/*
 * A native e1000-style descriptor loop run by the guest on the channel's NIC
 * (legacy 16-byte descriptors: buffer address at 0, length at 8, cmd at 11,
 * status at 12). The host sets the ring up; the guest moves frames as a tight
 * C loop would, doing the same work per frame as the Python driver: a transmit
 * copies `frame` into the descriptor's buffer, a receive copies each frame out
 * of its buffer into `frame` (the sink), and both wait for every descriptor.
 */
struct proxy_nic_loop {
    u64 ring_phys;                  /* the descriptor ring, in the DMA pool */
    u64 frame_phys;                 /* TX: the frame to send; RX: the sink (PROXY_NIC_SINK_BYTES), 0 for none */
    u64 timeout_us;
    u32 entries;                    /* ring size */
    u32 frame_len;                  /* TX: bytes per frame */
    u32 count;                      /* frames to send or receive */
    u32 tail_reg;                   /* BAR0 offset of TDT or RDT */
    u32 flush_reg;                  /* BAR0 offset read after each tail write (posted writes); 0: none */
    u32 next;                       /* in and out: TX tail, or RX next descriptor */
    u32 clean;                      /* in and out: TX oldest descriptor in flight */
    u32 done;                       /* out, updated as it goes: frames sent (written back) or received */
    u32 zero_copy;                  /* TX: every descriptor points at `frame` itself; nothing is copied */
};

/* One command of the native disk loop: where it reads and where the data go. */
struct proxy_disk_request {
    u64 lba;
    u64 phys;                       /* the command's one buffer, `sectors` * 512 bytes, in the DMA pool */
};

/*
 * A native AHCI read loop on one port: the host has set up the command list
 * (headers of slots 0..depth-1, one PRD each) and the port, and lists the
 * commands to run; the guest writes each FIS and PRD address by words, issues
 * and completes them with the same register accesses as the Python driver.
 */
struct proxy_disk_loop {
    u64 command_list;               /* the port's 32 command headers */
    u64 tables;                     /* command tables, table_size apart, slot k's at k */
    u64 requests;                   /* `count` struct proxy_disk_request, in the DMA pool */
    u64 timeout_us;
    u32 table_size;
    u32 port_offset;                /* BAR offset of the port's registers */
    u32 sectors;                    /* per command */
    u32 count;                      /* commands to complete */
    u32 depth;                      /* 1: READ DMA EXT; more: READ FPDMA QUEUED, this many in flight */
    u32 done;                       /* out: commands completed */
    u32 errors;                     /* out: commands that ended in a task-file error */
    u32 pad;
};

/*
 * One NVMe queue pair the Python driver created, as the native loop takes it
 * over and hands it back: where its entries are, its doorbells (BAR offsets),
 * and its state, read at the start and written back at the end.
 */
struct proxy_nvme_queue {
    u64 sq;                         /* submission queue: `entries` of 64 bytes */
    u64 cq;                         /* completion queue: `entries` of 16 bytes */
    u64 prp_lists;                  /* a 4 KiB PRP list page per command identifier 0..depth-1 */
    u32 entries;
    u32 depth;                      /* commands in flight at most (< entries) */
    u32 sq_doorbell;                /* BAR offset of the SQ tail doorbell */
    u32 cq_doorbell;                /* BAR offset of the CQ head doorbell */
    u32 tail, head, phase, acked;   /* in and out: SQ tail, CQ head, expected phase, head last rung */
    u64 sq_shadow, cq_shadow;       /* the doorbells' shadows (Doorbell Buffer Config), 0 for none:
                                       each value goes there before its doorbell is rung */
};

/*
 * A native NVMe loop: the same queue rounds as the Python driver's
 * QueuePair.run on up to two queue pairs at once, request i on queue
 * i % nqueues. Each command reads or writes `blocks` blocks into its own
 * buffer (struct proxy_disk_request: lba, phys), with PRP2 or a PRP list.
 */
struct proxy_nvme_loop {
    struct proxy_nvme_queue queues[PROXY_NVME_MAX_QUEUES];
    u64 requests;                   /* `count` struct proxy_disk_request, in the DMA pool */
    u64 timeout_us;
    u32 nqueues;
    u32 nsid;
    u32 opcode;                     /* NVM Read (2) or Write (1) */
    u32 blocks;                     /* per command */
    u32 block_size;                 /* 512 or 4096 */
    u32 count;
    u32 done;                       /* out: commands completed */
    u32 errors;                     /* out: of those, with an error status */
};

/* One NIC of a native forwarding loop: its rings, as the Python driver left them. */
struct proxy_nic_port {
    u64 rx_ring, tx_ring;           /* legacy descriptor rings, in the shared DMA domain */
    u32 rx_entries, tx_entries;
    u32 rx_next;                    /* in and out: next receive descriptor the NIC fills */
    u32 tx_tail, tx_clean;          /* in and out: next transmit descriptor; oldest in flight */
    u32 forwarded;                  /* out: frames received here and sent on the other NIC */
    u32 dropped;                    /* out: received here, dropped because the other's ring was full */
    u32 reserved;
};

/*
 * A native e1000 bridge (the in-guest baseline of the Python bridge, harness/services/bridge.py):
 * the channel's NIC (port 0) and the NIC of ring `peer` of the same window, opened into the
 * same DMA domain, forward to each other: a received buffer goes out on the other NIC as it
 * is, and its descriptor gets a fresh buffer from the pool (a stack of buffer addresses); a
 * sent buffer goes back to the pool. Batches of `batch` frames, one tail write each.
 */
struct proxy_nic_forward {
    struct proxy_nic_port ports[2];
    u64 pool;                       /* pool_size u64 buffer addresses, the free ones first */
    u64 timeout_us;
    u32 pool_size;
    u32 pool_free;                  /* in and out: free buffers at the bottom of the stack */
    u32 peer;                       /* the other NIC's ring in this window */
    u32 batch;                      /* frames taken from a ring at a time */
    u32 count;                      /* frames to forward, both ways together */
    u32 done;                       /* out, updated as it goes: frames forwarded */
    u32 rx_tail_reg, tx_tail_reg;   /* BAR0 offsets of RDT and TDT */
    u32 flush_reg;                  /* BAR0 offset read after a receive tail write (posted writes) */
    u32 reserved;
};

/*
 * Per channel: the DMA its device tried outside its domain, as the IOMMU's
 * fault recording registers reported it (VT-d 7.2). The latest fault's
 * details; `count` runs, so faults between two looks show.
 */
struct proxy_dma_fault {
    u32 count;                      /* faults so far */
    u16 source_id;                  /* bus << 8 | devfn of the device that faulted */
    u8 reason;                      /* the VT-d fault reason code */
    u8 write;                       /* 1: a DMA write; 0: a read */
    u64 addr;                       /* the faulting page (IOVA) */
    u64 tsc;                        /* guest TSC when the proxy read the record */
};

/* Per channel vector, written by the guest's interrupt handler; the host watches `count`.
 * INTx, MSI and ISA use a channel's vector 0; MSI-X entry v counts in vector v. */
struct proxy_irq {
    u32 count;                      /* interrupts delivered to this channel so far */
    u32 mode;                       /* enum proxy_irq_mode */
    u32 line;                       /* GSI (INTx), ISA IRQ bitmask (ISA), vector (MSI, MSI-X) */
    u32 masked;                     /* 1 while a level line waits for this channel's ack */
    u64 tsc;                        /* guest TSC at handler entry, latest interrupt */
    u64 reserved;
};

/* A window's per-request and per-interrupt words but its rings: a page of its own (the header above). */
struct proxy_window_hot {
    u8 host_sleeping[PROXY_DOORBELL_VECTORS];   /* host: 1 while it sleeps on doorbell vector n; ring it */
    struct proxy_irq irqs[PROXY_MAX_CHANNELS * PROXY_IRQ_VECTORS];    /* ring r's vector v at r * VECTORS + v */
    struct proxy_dma_fault dma_faults[PROXY_MAX_CHANNELS];              /* ring r's at r */
} __attribute__((aligned(4096)));

struct proxy_shared {
    u32 magic;                      /* PROXY_ABI_MAGIC once the guest is up */
    u32 abi_version;
    u32 state;                      /* enum proxy_state */
    u32 guest_sleeping;             /* guest: 0 awake; else the number of the halt it is in: kick it once */
    u32 ndevices;
    u32 slot;                       /* 0: the control window; n: driver slot n */
    u64 heartbeat;                  /* a slot's driver counts here while it is alive (the supervisor watches) */
    u64 tsc_hz;                     /* guest TSC frequency, calibrated on the PIT */
    u64 window_size;                /* bytes of BAR2 */
    u64 window_phys;                /* guest-physical address of BAR2 */
    u64 dma_offset;                 /* where the DMA pool starts in the window */
    u64 kicks;                      /* wake-ups by the host's kick (diagnostics, as of the last wake-up) */
    u64 served_total;               /* requests executed (diagnostics, as of the last wake-up) */
    u64 spurious_irqs;              /* interrupts nobody owned, and LAPIC/8259 spurious ones */
    u32 iommu;                      /* 1: DMA is translated, each device confined to its domain */
    u32 unowned_dma_faults;         /* faults by devices no channel holds */
    struct proxy_crash crash;
    struct proxy_pci_device devices[PROXY_MAX_DEVICES];
    /* From PROXY_HOT_OFFSET: window p uses hot[p]; channel c's ring is rings[c] (the header above). */
    struct proxy_window_hot hot[PROXY_MAX_SLOTS + 1] __attribute__((aligned(PROXY_HOT_OFFSET)));
    struct proxy_ring rings[PROXY_TOTAL_CHANNELS];
};

#endif
