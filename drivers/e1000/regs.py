"""82540EM (e1000) registers: Intel PCI/PCI-X Family of Gigabit Ethernet Controllers
Software Developer's Manual (8254x), section 13. Only what the driver uses."""

import enum


class Reg(enum.IntEnum):
    CTRL = 0x0000       # device control
    STATUS = 0x0008     # device status
    EERD = 0x0014       # EEPROM read
    ICR = 0x00C0        # interrupt cause read (clears on read)
    ITR = 0x00C4        # interrupt throttling: minimum gap in 256 ns units
    ICS = 0x00C8        # interrupt cause set
    IMS = 0x00D0        # interrupt mask set
    IMC = 0x00D8        # interrupt mask clear
    RCTL = 0x0100       # receive control
    TCTL = 0x0400       # transmit control
    TIPG = 0x0410       # transmit inter-packet gap
    RDBAL = 0x2800      # receive descriptor base, low
    RDBAH = 0x2804
    RDLEN = 0x2808      # receive ring length in bytes
    RDH = 0x2810        # receive head (hardware's)
    RDT = 0x2818        # receive tail (ours)
    RDTR = 0x2820       # receive delay timer
    TDBAL = 0x3800
    TDBAH = 0x3804
    TDLEN = 0x3808
    TDH = 0x3810
    TDT = 0x3818
    TIDV = 0x3820       # transmit interrupt delay
    MTA = 0x5200        # multicast table array, 128 registers
    RAL0 = 0x5400       # receive address 0, low
    RAH0 = 0x5404       # receive address 0, high (+ Address Valid)


MTA_ENTRIES = 128


class Ctrl(enum.IntFlag):
    ASDE = 1 << 5       # auto-speed detection
    SLU = 1 << 6        # set link up
    RST = 1 << 26       # device reset (self-clearing)


class StatusBits(enum.IntFlag):
    FD = 1 << 0
    LU = 1 << 1         # link up


class Eerd(enum.IntFlag):
    START = 1 << 0
    DONE = 1 << 4       # on the 82540EM (8254x manual 13.4.4)


EERD_ADDR_SHIFT = 8
EERD_DATA_SHIFT = 16


class Icr(enum.IntFlag):
    TXDW = 1 << 0       # transmit descriptor written back
    TXQE = 1 << 1       # transmit queue empty
    LSC = 1 << 2        # link status change
    RXDMT0 = 1 << 4     # receive descriptors below the minimum threshold
    RXO = 1 << 6        # receiver overrun
    RXT0 = 1 << 7       # receiver timer: frames arrived


class Rctl(enum.IntFlag):
    EN = 1 << 1
    SBP = 1 << 2        # store bad packets
    UPE = 1 << 3        # unicast promiscuous
    MPE = 1 << 4        # multicast promiscuous
    BAM = 1 << 15       # accept broadcast
    SECRC = 1 << 26     # strip the Ethernet CRC
    # BSIZE = 00 (bits 16-17) with BSEX = 0: 2048-byte buffers


class Tctl(enum.IntFlag):
    EN = 1 << 1
    PSP = 1 << 3        # pad short packets to 64 bytes


TCTL_CT = 0x0F << 4     # collision threshold (8254x manual: 0Fh)
TCTL_COLD_FD = 0x40 << 12   # collision distance, full duplex
TIPG_82540 = 10 | 8 << 10 | 6 << 20     # IPGT, IPGR1, IPGR2 (manual 13.4.34, copper)


class Stat(enum.IntEnum):
    """Statistics registers: they clear when read (manual 13.7)."""
    CRCERRS = 0x4000    # CRC errors
    MPC = 0x4010        # missed packets: no receive descriptor
    GPRC = 0x4074       # good packets received
    GPTC = 0x4080       # good packets transmitted
    GORCL = 0x4088      # good octets received (low)
    GOTCL = 0x4090      # good octets transmitted (low)
    TPR = 0x40D0        # total packets received
    TPT = 0x40D4        # total packets transmitted
