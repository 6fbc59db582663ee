// KVM's `kvm->mmu_lock`, an rwlock on x86: the shadow MMU and every memslot-wide or zapping TDP MMU
// operation hold it for write; TDP MMU page faults (and aging, eager splitting, write-protecting a
// slot) hold it for read and change SPTEs with compare-and-exchange.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// A readers-writer lock, shared by everything that changes one VM's MMU state.
///
/// Not recursive in either mode: a thread holding it must not take it again (with writers waiting,
/// a second read lock would deadlock, as it would in the kernel). Writers are preferred, as KVM's
/// queued rwlock is fair to them: without that, a steady stream of faulting vCPUs would starve a
/// zap.
///
/// Like KVM's qrwlock, an uncontended lock or unlock is one atomic operation on one word (pthread's
/// rwlock took about 55 instructions a pair, four pairs a TDP fault through the vCPU). Only
/// waiting goes through a pthread mutex and condition variables. ThreadSanitizer sees the lock
/// through the word's acquiring and releasing operations, which are compiled with this module.
public final class MMULock: @unchecked Sendable {
    /// Readers holding the lock in the low 32 bits, then `writerHeld`, the writers waiting for it
    /// counted from `oneWaitingWriter`, and `readersSleeping`. On a cache-line pair of its own, so
    /// that the lock's traffic is the word's alone.
    @usableFromInline let word: UnsafeMutablePointer<Atomic<UInt64>>
    private let waitLock: UnsafeMutablePointer<pthread_mutex_t>
    private let readersWake: UnsafeMutablePointer<pthread_cond_t>
    private let writersWake: UnsafeMutablePointer<pthread_cond_t>

    @usableFromInline static var readerMask: UInt64 { 0xFFFF_FFFF }
    @usableFromInline static var writerHeld: UInt64 { 1 << 32 }
    @usableFromInline static var oneWaitingWriter: UInt64 { 1 << 33 }
    @usableFromInline static var waitingWritersMask: UInt64 { 0x3FFF_FFFF << 33 }
    /// A reader sleeps on `readersWake`: the writer's unlock must wake it.
    @usableFromInline static var readersSleeping: UInt64 { 1 << 63 }
    /// What keeps a reader out: a writer holding the lock or waiting for it.
    @usableFromInline static var excludesReaders: UInt64 { writerHeld | waitingWritersMask }

    public init() {
        let raw = UnsafeMutableRawPointer.allocate(byteCount: 128, alignment: 128)
        word = raw.bindMemory(to: Atomic<UInt64>.self, capacity: 1)
        word.initialize(to: Atomic(0))
        waitLock = .allocate(capacity: 1)
        waitLock.initialize(to: pthread_mutex_t())
        pthread_mutex_init(waitLock, nil)
        readersWake = .allocate(capacity: 1)
        readersWake.initialize(to: pthread_cond_t())
        pthread_cond_init(readersWake, nil)
        writersWake = .allocate(capacity: 1)
        writersWake.initialize(to: pthread_cond_t())
        pthread_cond_init(writersWake, nil)
    }

    deinit {
        pthread_cond_destroy(writersWake)
        writersWake.deallocate()
        pthread_cond_destroy(readersWake)
        readersWake.deallocate()
        pthread_mutex_destroy(waitLock)
        waitLock.deallocate()
        word.deinitialize(count: 1)
        UnsafeMutableRawPointer(word).deallocate()
    }

    /// `read_lock(&kvm->mmu_lock)`.
    @inlinable
    public func lockShared() {
        if !tryLockShared() { lockSharedWaiting() }
    }

    /// `read_unlock`.
    @inlinable
    public func unlockShared() {
        let left = word.pointee.wrappingSubtract(1, ordering: .releasing).newValue
        if left & Self.readerMask == 0 && left & Self.waitingWritersMask != 0 { wakeWaiters() }
    }

    /// `write_lock(&kvm->mmu_lock)`.
    @inlinable
    public func lockExclusive() {
        if !tryLockExclusive() { lockExclusiveWaiting() }
    }

    /// `write_unlock`.
    @inlinable
    public func unlockExclusive() {
        let left = word.pointee.wrappingSubtract(Self.writerHeld, ordering: .releasing).newValue
        if left & (Self.waitingWritersMask | Self.readersSleeping) != 0 { wakeWaiters() }
    }

    /// Takes the lock for read only if no writer holds it or waits for it; true when it did.
    @inlinable
    public func tryLockShared() -> Bool {
        var current = word.pointee.load(ordering: .relaxed)
        while current & Self.excludesReaders == 0 {
            let (taken, found) = word.pointee.weakCompareExchange(expected: current, desired: current + 1,
                                                                  successOrdering: .acquiring, failureOrdering: .relaxed)
            if taken { return true }
            current = found
        }
        return false
    }

    /// Takes the lock for write only if no one holds it; true when it did.
    @inlinable
    public func tryLockExclusive() -> Bool {
        var current = word.pointee.load(ordering: .relaxed)
        while current & (Self.readerMask | Self.writerHeld | Self.waitingWritersMask) == 0 {
            let (taken, found) = word.pointee.weakCompareExchange(expected: current, desired: current | Self.writerHeld,
                                                                  successOrdering: .acquiring, failureOrdering: .relaxed)
            if taken { return true }
            current = found
        }
        return false
    }

    /// A reader that found a writer: sleeps until no writer holds or waits for the lock. The
    /// `readersSleeping` bit is set only over the word the reader saw, so a writer's unlock either
    /// comes after it (and wakes the reader) or changes the word first (and the reader looks again).
    @usableFromInline
    func lockSharedWaiting() {
        pthread_mutex_lock(waitLock)
        defer { pthread_mutex_unlock(waitLock) }
        while true {
            if tryLockShared() { return }
            let current = word.pointee.load(ordering: .relaxed)
            guard current & Self.excludesReaders != 0 else { continue }
            if current & Self.readersSleeping == 0 {
                guard word.pointee.compareExchange(expected: current, desired: current | Self.readersSleeping,
                                                   ordering: .relaxed).exchanged
                else { continue }
            }
            pthread_cond_wait(readersWake, waitLock)
        }
    }

    /// A writer that found the lock held: counted as waiting (which keeps new readers out), it
    /// sleeps until the last holder leaves, then takes the lock in the same step as it stops
    /// waiting. Holding `waitLock` from its look at the word to its sleep, it cannot miss the
    /// holder's wake-up, which takes `waitLock` too.
    @usableFromInline
    func lockExclusiveWaiting() {
        pthread_mutex_lock(waitLock)
        defer { pthread_mutex_unlock(waitLock) }
        word.pointee.wrappingAdd(Self.oneWaitingWriter, ordering: .relaxed)
        while true {
            let current = word.pointee.load(ordering: .relaxed)
            if current & (Self.readerMask | Self.writerHeld) == 0 {
                let desired = (current - Self.oneWaitingWriter) | Self.writerHeld
                if word.pointee.compareExchange(expected: current, desired: desired, ordering: .acquiring).exchanged { return }
                continue
            }
            pthread_cond_wait(writersWake, waitLock)
        }
    }

    /// The last reader or a writer left while others wait: every sleeper looks again (a writer
    /// takes the lock, readers sleep on while writers wait).
    @usableFromInline
    func wakeWaiters() {
        pthread_mutex_lock(waitLock)
        word.pointee.bitwiseAnd(~Self.readersSleeping, ordering: .relaxed)
        pthread_cond_broadcast(writersWake)
        pthread_cond_broadcast(readersWake)
        pthread_mutex_unlock(waitLock)
    }

    /// Runs `body` with the lock held for read.
    @inlinable
    public func withReadLock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        lockShared()
        defer { unlockShared() }
        return try body()
    }

    /// Runs `body` with the lock held for write.
    @inlinable
    public func withWriteLock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        lockExclusive()
        defer { unlockExclusive() }
        return try body()
    }
}

/// A value guarded by a pthread mutex: KVM's spinlocks inside mmu_lock (`tdp_mmu_pages_lock`).
/// pthread rather than `Synchronization.Mutex` so that ThreadSanitizer, which runs the concurrency
/// tests, sees the lock (it does not see the futex-based `Mutex` on Linux).
public final class LockedValue<Value>: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value

    public init(_ value: Value) {
        self.value = value
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public func withLock<Result, Failure: Error>(_ body: (inout Value) throws(Failure) -> Result) throws(Failure) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
