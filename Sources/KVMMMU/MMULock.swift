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

/// A readers-writer lock over pthread's, shared by everything that changes one VM's MMU state.
///
/// Not recursive in either mode: a thread holding it must not take it again (with writers waiting,
/// a second read lock would deadlock, as it would in the kernel). Writers are preferred on glibc, as
/// KVM's queued rwlock is fair to them: without that, a steady stream of faulting vCPUs would starve
/// a zap.
public final class MMULock: @unchecked Sendable {
    private let rwlock: UnsafeMutablePointer<pthread_rwlock_t>

    public init() {
        rwlock = .allocate(capacity: 1)
        rwlock.initialize(to: pthread_rwlock_t())
        var attributes = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attributes)
        #if canImport(Glibc)
        pthread_rwlockattr_setkind_np(&attributes, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        #endif
        let status = pthread_rwlock_init(rwlock, &attributes)
        pthread_rwlockattr_destroy(&attributes)
        precondition(status == 0, "pthread_rwlock_init failed with \(status)")
    }

    deinit {
        pthread_rwlock_destroy(rwlock)
        rwlock.deallocate()
    }

    /// `read_lock(&kvm->mmu_lock)`.
    public func lockShared() { pthread_rwlock_rdlock(rwlock) }
    /// `read_unlock`.
    public func unlockShared() { pthread_rwlock_unlock(rwlock) }
    /// `write_lock(&kvm->mmu_lock)`.
    public func lockExclusive() { pthread_rwlock_wrlock(rwlock) }
    /// `write_unlock`.
    public func unlockExclusive() { pthread_rwlock_unlock(rwlock) }

    /// Takes the lock for read only if no writer holds it or waits for it; true when it did.
    public func tryLockShared() -> Bool { pthread_rwlock_tryrdlock(rwlock) == 0 }

    /// Takes the lock for write only if no one holds it; true when it did.
    public func tryLockExclusive() -> Bool { pthread_rwlock_trywrlock(rwlock) == 0 }

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
