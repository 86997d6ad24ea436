"""What drivers serve to others: the block protocol and a disk service, a small network
stack over any NIC, an echo service, and the host's side of a UDP stream."""
