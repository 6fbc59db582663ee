import Foundation
import Synchronization
import Testing
@testable import KVMMMU

/// `MMULock` on real threads: readers share it, a writer excludes everyone, and a waiting writer
/// keeps new readers out (KVM's qrwlock is fair to writers; a vCPU's hardware walk that cannot
/// have the lock at once exits instead of starving a zap).
@Suite(.serialized) struct MMULockTests {
    /// A value the lock guards, read and written without atomics.
    final class Guarded: @unchecked Sendable {
        var writes = 0
        var pair = (0, 0)
    }

    @Test func writersExcludeEveryoneAndReadersSeeWholeUpdates() {
        let lock = MMULock()
        let guarded = Guarded()
        let tornReads = Atomic<Int>(0)
        let perThread = 2000
        DispatchQueue.concurrentPerform(iterations: 4) { thread in
            for step in 0..<perThread {
                if thread % 2 == 0 || step % 4 == 0 {
                    lock.withWriteLock {
                        guarded.writes += 1
                        guarded.pair.0 += 1
                        guarded.pair.1 += 1
                    }
                } else {
                    lock.withReadLock {
                        if guarded.pair.0 != guarded.pair.1 { tornReads.add(1, ordering: .relaxed) }
                    }
                }
            }
        }
        let torn = tornReads.load(ordering: .relaxed)
        #expect(torn == 0)
        #expect(guarded.writes == 2 * perThread + 2 * perThread / 4)
        #expect(lock.tryLockExclusive())
        lock.unlockExclusive()
    }

    @Test func aWaitingWriterKeepsNewReadersOut() {
        let lock = MMULock()
        lock.lockShared()
        #expect(!lock.tryLockExclusive())
        #expect(lock.tryLockShared())
        lock.unlockShared()
        let writerHeld = Atomic<Bool>(false)
        let writerDone = DispatchSemaphore(value: 0)
        Thread {
            lock.lockExclusive()
            writerHeld.store(true, ordering: .releasing)
            lock.unlockExclusive()
            writerDone.signal()
        }.start()
        // Once the writer waits, a reader cannot join the one still holding the lock.
        var readerRefused = false
        for _ in 0..<100_000 {
            if lock.tryLockShared() {
                lock.unlockShared()
                sched_yield()
            } else {
                readerRefused = true
                break
            }
        }
        #expect(readerRefused)
        let heldWhileReading = writerHeld.load(ordering: .acquiring)
        #expect(!heldWhileReading)
        lock.unlockShared()
        writerDone.wait()
        let heldOnce = writerHeld.load(ordering: .acquiring)
        #expect(heldOnce)
        // A reader that had to wait for the writer gets the lock once it is gone.
        lock.lockShared()
        lock.unlockShared()
    }

    @Test func readersBlockedByAWriterGetTheLockWhenItLeaves() {
        let lock = MMULock()
        lock.lockExclusive()
        let readersIn = Atomic<Int>(0)
        let group = DispatchGroup()
        for _ in 0..<3 {
            group.enter()
            Thread {
                lock.lockShared()
                readersIn.add(1, ordering: .relaxed)
                lock.unlockShared()
                group.leave()
            }.start()
        }
        usleep(20_000)
        let inWhileWriting = readersIn.load(ordering: .relaxed)
        #expect(inWhileWriting == 0)
        lock.unlockExclusive()
        group.wait()
        let inAfterwards = readersIn.load(ordering: .relaxed)
        #expect(inAfterwards == 3)
    }
}
