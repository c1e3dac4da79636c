# Bounded FIFO of readings waiting to be sent: when full, the oldest is dropped and counted.


class RingBuffer:
    def __init__(self, capacity):
        self.items = [None] * capacity
        self.capacity = capacity
        self.head = 0     # index of the oldest item
        self.size = 0
        self.dropped = 0  # readings lost to the bound, reported in every status message

    def __len__(self):
        return self.size

    def push(self, item):
        if self.size == self.capacity:
            self.head = (self.head + 1) % self.capacity
            self.size -= 1
            self.dropped += 1
        self.items[(self.head + self.size) % self.capacity] = item
        self.size += 1

    def peek(self):
        return self.items[self.head] if self.size else None

    def pop(self):
        item = self.items[self.head]
        self.items[self.head] = None
        self.head = (self.head + 1) % self.capacity
        self.size -= 1
        return item
