// SPDX-License-Identifier: GPL-2.0
/*
 * netmem.c - /dev/netmem: a mapped area whose page faults are served by the
 * netmemfs daemon in user space (docs/kmod.md).
 *
 * A process opens /dev/netmem, names a segment and a size (NETMEM_IOC_ATTACH)
 * and maps the file MAP_SHARED. A fault on a page the area does not hold
 * allocates a page, queues a FETCH request and sleeps until the daemon (the
 * file that issued NETMEM_IOC_PROVIDE) has read the request and written the
 * page's contents back, or until the timeout; then the page is installed.
 * The network stays in user space: the daemon fetches pages with netmemfs's
 * own client.
 *
 * Each open file has an address_space of its own (file->f_mapping), holding
 * nothing in its page cache but linking the file's mappings, so that
 * folio_mkclean() finds every PTE of a page. A write to a clean page calls
 * page_mkwrite(), which marks it dirty. fsync() (and so msync(MS_SYNC))
 * write-protects every dirty page again, copies it, and hands the copies to
 * the daemon, which commits them as one transaction.
 *
 * Clean pages beyond an area's budget, or asked for by the shrinker, are
 * unmapped and dropped; they fault in again.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/capability.h>
#include <linux/completion.h>
#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/pagemap.h>
#include <linux/poll.h>
#include <linux/rmap.h>
#include <linux/sched/signal.h>
#include <linux/shrinker.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/xarray.h>

#include "netmem_uapi.h"

static unsigned int timeout_ms = 30000;
module_param(timeout_ms, uint, 0644);
MODULE_PARM_DESC(timeout_ms,
		 "How long a fault, an attach or a sync's page hand-over waits for the daemon, in ms");

/* A commit of a 16 GiB area moves 16 GiB over the network: not in 30 s. */
static unsigned int sync_timeout_ms = 600000;
module_param(sync_timeout_ms, uint, 0644);
MODULE_PARM_DESC(sync_timeout_ms,
		 "How long a sync waits for the daemon to commit its pages (COMMIT_END), in ms");

/**
 * struct nm_area - what one open file of /dev/netmem maps
 * @ref: the file and each of its mappings hold one
 * @mapping: links the file's mappings, for folio_mkclean() (no page cache)
 * @lock: serializes attach, sync and eviction
 * @id: names the area in requests
 * @segment: the server segment, NUL-terminated
 * @npages: the area's size in pages; 0 until attached
 * @pages: page number -> the page (holding a reference)
 * @failed: page number -> why a fetch that let go of the mmap lock failed, for
 *          the retried fault (nm_failure_*)
 * @dirty: pages written since they were last synced
 * @commits: syncs started
 * @provider: this file is the daemon's, not an area
 * @store: the store whose provider attached the area (or, for the provider's
 *         file, the one it serves)
 * @budget: clean pages kept resident at most; 0: no budget
 * @resident: pages in @pages
 * @hand: where the next eviction starts looking (a clock hand over @pages;
 *        under @lock)
 * @node: on nm_areas once attached, for the shrinker
 */
struct nm_area {
	struct kref ref;
	struct address_space mapping;
	struct mutex lock;		/* serializes attach, sync, eviction */
	u64 id;
	char segment[NETMEM_SEGMENT_MAX];
	unsigned long npages;
	struct xarray pages;
	struct xarray failed;
	unsigned long *dirty;
	u64 commits;
	bool provider;
	char store[NETMEM_SEGMENT_MAX];
	unsigned long budget;
	atomic_long_t resident;
	unsigned long hand;
	struct list_head node;
};

/**
 * struct nm_req - a request to the daemon and its answer
 * @node: on nm.pending until the daemon reads it
 * @done: completed when answered, consumed (no reply) or failed
 * @msg: what the daemon reads
 * @payload: COMMIT_PAGES: the message's payload (the sync's buffer)
 * @page: FETCH: where the data goes
 * @store: OPEN: the store of the provider it was queued for
 * @status: 0 or -errno, valid once @done
 * @queued: on nm.pending or read by the daemon: nm_provider_gone() fails it
 * @read: the daemon has read it; a reply may come
 * @claimed: taken out of nm.reqs by whoever completes it; the waiter must
 *           then wait for @done instead of freeing the request
 * @nowait: nobody waits for it (COMMIT_ABORT): freed once read or failed
 */
struct nm_req {
	struct list_head node;
	struct completion done;
	struct netmem_msg msg;
	const void *payload;
	struct page *page;
	char store[NETMEM_SEGMENT_MAX];
	int status;
	bool queued;
	bool read;
	bool claimed;
	bool nowait;
};

/**
 * struct nm_dev - the device
 * @misc: /dev/netmem
 * @lock: protects everything below, and the flags of every request in @reqs
 * @provider: the daemon's file, or NULL
 * @store: the store the daemon serves
 * @pending: requests the daemon has not read yet, oldest first
 * @reqs: request id -> every request submitted and not yet claimed, so a
 *        reply finds its request without a walk (xa_lock nests inside @lock)
 * @wq: the daemon waits here for requests
 * @read_lock: serializes the daemon's reads
 * @next_area: area ids
 */
struct nm_dev {
	struct miscdevice misc;
	spinlock_t lock;		/* protects the queue, ids and flags */
	struct file *provider;
	char store[NETMEM_SEGMENT_MAX];
	struct list_head pending;
	struct xarray reqs;
	wait_queue_head_t wq;
	struct mutex read_lock;		/* one reader at a time */
	u64 next_area;
};

static struct nm_dev nm;

/*
 * Request ids; an unsigned long indexes nm.reqs, and ids never repeat while
 * a request lives (2^64 on the 64-bit kernels the module is built for).
 */
static atomic64_t nm_next_id = ATOMIC64_INIT(0);

/*
 * Every attached area, for the shrinker; nm_areas_lock is never held while
 * allocating, so reclaim can take it (it only tries).
 */
static LIST_HEAD(nm_areas);
static DEFINE_MUTEX(nm_areas_lock);
/* Pages held by all areas: what the shrinker may free at most. */
static atomic_long_t nm_resident = ATOMIC_LONG_INIT(0);

/*
 * The errnos a daemon may answer with: real ones only. Values from -512 down
 * (-ERESTARTSYS and the like) are the kernel's own and must never reach user
 * space; FUSE refuses them the same way.
 */
#define NM_MAX_DAEMON_ERRNO	511

static const struct address_space_operations nm_aops = {
	.dirty_folio = noop_dirty_folio,
};

/* ---- requests ----------------------------------------------------------- */

/*
 * Queue @req for the daemon and wait up to @wait_ms for its answer (or, for
 * COMMIT_PAGES, for the daemon to have read it). @store: the store that must
 * serve it (the area's), or NULL for OPEN, which goes to the daemon there is.
 * Returns req->status, or -ENXIO (no daemon), -ESTALE (a daemon of another
 * store), -ETIMEDOUT, -EINTR (a fatal signal), -ENOMEM. The caller frees @req,
 * unless it is @nowait: then the module does, and nothing is awaited.
 */
static int nm_submit(struct nm_req *req, const char *store,
		     unsigned int wait_ms)
{
	unsigned long id = atomic64_inc_return(&nm_next_id);
	bool nowait = req->nowait;	/* req may be gone once queued */
	long left;
	int err;

	init_completion(&req->done);
	INIT_LIST_HEAD(&req->node);
	req->msg.id = id;
	/* Indexed before it is queued: a reply then finds it without a walk. */
	err = xa_insert(&nm.reqs, id, req, GFP_KERNEL);
	if (err)
		goto out_free;
	spin_lock(&nm.lock);
	err = !nm.provider ? -ENXIO :
	      store && strcmp(store, nm.store) ? -ESTALE : 0;
	if (err) {
		xa_erase(&nm.reqs, id);
		spin_unlock(&nm.lock);
		goto out_free;
	}
	if (!store)
		memcpy(req->store, nm.store, NETMEM_SEGMENT_MAX);
	req->queued = true;
	list_add_tail(&req->node, &nm.pending);
	spin_unlock(&nm.lock);
	wake_up_interruptible(&nm.wq);
	if (nowait)
		return 0;

	left = wait_for_completion_killable_timeout(&req->done,
						    msecs_to_jiffies(wait_ms));
	if (left > 0)
		return req->status;
	spin_lock(&nm.lock);
	if (!req->claimed) {
		list_del_init(&req->node);
		xa_erase(&nm.reqs, id);
		spin_unlock(&nm.lock);
		return left == 0 ? -ETIMEDOUT : -EINTR;
	}
	spin_unlock(&nm.lock);
	/* An answer is being copied in right now: it ends soon. */
	wait_for_completion(&req->done);
	return req->status;
out_free:
	if (nowait)
		kfree(req);
	return err;
}

static const char *nm_why(int err)
{
	switch (err) {
	case -ENXIO:
		return "no netmemfs daemon serves /dev/netmem (start `netmemfs serve-device`)";
	case -ETIMEDOUT:
		return "the daemon did not answer in time (module parameter timeout_ms)";
	case -EPIPE:
		return "the daemon went away";
	case -ESTALE:
		return "the daemon serves another store than the area's";
	case -EINTR:
		return "the task was killed while waiting";
	case -ENOMEM:
		return "out of memory";
	default:
		return "the daemon reported an error";
	}
}

/* The daemon closed its file: fail everything it owes. */
static void nm_provider_gone(void)
{
	struct nm_req *req, *tmp;
	unsigned long id;
	LIST_HEAD(failed);

	spin_lock(&nm.lock);
	nm.provider = NULL;
	xa_for_each(&nm.reqs, id, req) {
		if (!req->queued)
			continue;	/* its submitter sees no daemon */
		xa_erase(&nm.reqs, id);
		req->claimed = true;
		list_del(&req->node);	/* off nm.pending, if it was there */
		list_add_tail(&req->node, &failed);
	}
	spin_unlock(&nm.lock);
	list_for_each_entry_safe(req, tmp, &failed, node) {
		list_del_init(&req->node);
		if (req->nowait) {
			kfree(req);
			continue;
		}
		req->status = -EPIPE;
		complete(&req->done);	/* the waiter frees req */
	}
	pr_warn("the netmemfs daemon closed /dev/netmem; faults that need it get SIGBUS until a daemon serves it again\n");
}

/* ---- areas -------------------------------------------------------------- */

static void nm_area_free(struct kref *ref)
{
	struct nm_area *area = container_of(ref, struct nm_area, ref);
	struct page *page;
	unsigned long idx, unsynced;

	if (!list_empty(&area->node)) {
		/* First: the shrinker must not find the area any more. */
		mutex_lock(&nm_areas_lock);
		list_del(&area->node);
		mutex_unlock(&nm_areas_lock);
	}
	/*
	 * Pages written since the last sync die with the area, as a mount's
	 * unsynced writes die at unmount: committing here would have an exiting
	 * task wait on the network. Say how many.
	 */
	unsynced = area->dirty ? bitmap_weight(area->dirty, area->npages) : 0;
	if (unsynced)
		pr_info("segment %s: %lu pages written since the last sync were dropped at the last close (msync or fsync before closing keeps them)\n",
			area->segment, unsynced);
	/* No mapping is left (each holds a reference): no PTE maps a page. */
	xa_for_each(&area->pages, idx, page) {
		page->mapping = NULL;
		ClearPageDirty(page);
		put_page(page);
		cond_resched();	/* an area may hold millions of pages */
	}
	atomic_long_sub(atomic_long_read(&area->resident), &nm_resident);
	xa_destroy(&area->pages);
	xa_destroy(&area->failed);
	kvfree(area->dirty);
	kfree(area);
}

static void nm_area_put(struct nm_area *area)
{
	kref_put(&area->ref, nm_area_free);
}

/* Page @idx of @area with a reference of the caller's, or NULL. */
static struct page *nm_get_page(struct nm_area *area, unsigned long idx)
{
	struct page *page;

	/* Eviction takes a page out under this lock before it lets go of it. */
	xa_lock(&area->pages);
	page = xa_load(&area->pages, idx);
	if (page)
		get_page(page);
	xa_unlock(&area->pages);
	return page;
}

/*
 * Drop page @idx of @area if it is clean: unmap it from every mapping, take it
 * out of the area and let go of it. @wait: wait for the page's lock (a fault
 * installing it holds it) rather than pass it by. Called with area->lock held.
 * Returns whether it went.
 */
static bool nm_drop(struct nm_area *area, unsigned long idx, struct page *page,
		    bool wait)
{
	struct folio *folio = page_folio(page);

	if (test_bit(idx, area->dirty))
		return false;
	if (wait)
		folio_lock(folio);
	else if (!folio_trylock(folio))
		return false;
	/* page_mkwrite marks a page dirty under its lock: look again. */
	if (test_bit(idx, area->dirty) || folio->mapping != &area->mapping) {
		folio_unlock(folio);
		return false;
	}
	/*
	 * A fault maps a page only with its lock held, after checking
	 * page->mapping: once unmapped here, no PTE can come back before the
	 * page has left the area.
	 */
	unmap_mapping_range(&area->mapping, (loff_t)idx << PAGE_SHIFT,
			    PAGE_SIZE, 0);
	if (folio_mapped(folio)) {
		folio_unlock(folio);
		return false;
	}
	xa_erase(&area->pages, idx);
	folio->mapping = NULL;
	folio_unlock(folio);
	put_page(page);
	atomic_long_dec(&area->resident);
	atomic_long_dec(&nm_resident);
	return true;
}

/*
 * Drop up to @want clean pages of @area: unmap each from every mapping, take
 * it out of the area and let go of it; a later fault fetches it again. Dirty
 * pages are the only copy of unsynced writes and stay. Pages are tried in
 * index order from where the last eviction stopped (a clock hand), each at
 * most once. Nothing here waits for a lock, so the shrinker can call it; a
 * sync in progress (it holds area->lock) puts eviction off, since the pages it
 * sent must stay until it knows whether they were committed. Returns the
 * pages dropped.
 */
static unsigned long nm_evict(struct nm_area *area, unsigned long want)
{
	unsigned long idx, tries, freed = 0;
	struct page *page;

	if (!mutex_trylock(&area->lock))
		return 0;
	idx = area->hand;
	for (tries = atomic_long_read(&area->resident); tries && freed < want;
	     tries--, idx++) {
		/*
		 * Only eviction takes pages out, under area->lock: no reference
		 * is needed to look at them here.
		 */
		page = xa_find(&area->pages, &idx, ULONG_MAX, XA_PRESENT);
		if (!page) {
			idx = 0;	/* past the last page: wrap around */
			page = xa_find(&area->pages, &idx, ULONG_MAX,
				       XA_PRESENT);
			if (!page)
				break;
		}
		if (nm_drop(area, idx, page, false))
			freed++;
		cond_resched();
	}
	area->hand = idx;
	mutex_unlock(&area->lock);
	return freed;
}

/*
 * Invalidate: another client committed pages [first, first + count) of the
 * area's file. Drop those held clean; dirty ones stay (the local write wins
 * until its own sync). A sync under way (area->lock) must keep its pages
 * until it knows its outcome: -EBUSY, and the daemon asks again after it.
 */
static long nm_invalidate(struct file *file, void __user *uarg)
{
	struct netmem_invalidate inv;
	struct nm_area *area = NULL, *a;
	unsigned long idx, end, npages;
	struct page *page;
	long err = 0;

	if (file != READ_ONCE(nm.provider))
		return -EINVAL;
	if (copy_from_user(&inv, uarg, sizeof(inv)))
		return -EFAULT;
	mutex_lock(&nm_areas_lock);
	list_for_each_entry(a, &nm_areas, node) {
		/* An area whose last reference went is being freed: not it. */
		if (a->id == inv.area && kref_get_unless_zero(&a->ref)) {
			area = a;
			break;
		}
	}
	mutex_unlock(&nm_areas_lock);
	if (!area)
		return -ENOENT;
	/* Pairs with the smp_store_release() in nm_attach(). */
	npages = smp_load_acquire(&area->npages);
	if (inv.first >= npages)
		goto out_put;
	end = inv.count > npages - inv.first ? npages : inv.first + inv.count;
	if (!mutex_trylock(&area->lock)) {
		err = -EBUSY;
		goto out_put;
	}
	for (idx = inv.first; idx < end; idx++) {
		/* Only eviction takes pages out, under area->lock (held). */
		page = xa_load(&area->pages, idx);
		if (page)
			nm_drop(area, idx, page, true);
		cond_resched();
	}
	mutex_unlock(&area->lock);
out_put:
	nm_area_put(area);
	return err;
}

/*
 * Page @idx of @area from the daemon, installed in the area; 0 or -errno.
 * *oom says the failure was ours (no memory here), not the daemon's.
 */
static int nm_fetch(struct nm_area *area, unsigned long idx, bool *oom)
{
	unsigned long resident = atomic_long_read(&area->resident);
	struct page *page, *old;
	struct nm_req *req;
	int err;

	/* Make room first, so the page fetched now is not what goes. */
	if (area->budget && resident >= area->budget)
		nm_evict(area, resident + 1 - area->budget);
	/* Charged to the faulting task's memory cgroup, like any page it maps. */
	page = alloc_page(GFP_HIGHUSER | __GFP_ZERO | __GFP_ACCOUNT);
	req = kzalloc(sizeof(*req), GFP_KERNEL);
	if (!page || !req) {
		err = -ENOMEM;
		*oom = true;
		goto out_free;
	}
	req->msg.type = NETMEM_MSG_FETCH;
	req->msg.area = area->id;
	req->msg.page = idx;
	req->msg.size = (u64)area->npages << PAGE_SHIFT;
	memcpy(req->msg.segment, area->segment, NETMEM_SEGMENT_MAX);
	req->page = page;
	err = nm_submit(req, area->store, timeout_ms);
	kfree(req);
	req = NULL;
	if (err)
		goto out_free;
	/* A hole stays as allocated: zeros, nothing was copied. */
	page->mapping = &area->mapping;
	page_folio(page)->index = idx;
	old = xa_cmpxchg(&area->pages, idx, NULL, page, GFP_KERNEL);
	if (!old) {
		atomic_long_inc(&area->resident);
		atomic_long_inc(&nm_resident);
		return 0;
	}
	/* Another fault installed it first (or the xarray failed). */
	page->mapping = NULL;
	put_page(page);
	if (xa_is_err(old)) {
		*oom = true;
		return xa_err(old);
	}
	return 0;
out_free:
	kfree(req);
	if (page)
		put_page(page);
	return err;
}

/*
 * A fetch that failed without the mmap lock, kept for the fault that is retried
 * right after: its errno, whether it was our own OOM, and when (jiffies, which
 * fit in the 47 bits left for thousands of years). Older than a second it is
 * ignored: the retried fault comes within microseconds, and an entry left by a
 * fault that was never retried must not fail another one much later.
 */
static void nm_failure_note(struct nm_area *area, unsigned long idx, int err,
			    bool oom)
{
	unsigned long now = jiffies;
	unsigned long v = (now << 16) | (oom ? 0x8000 : 0) | (-err & 0x7fff);

	/* If it cannot be kept, the retried fault fetches again: no harm. */
	xa_store(&area->failed, idx, xa_mk_value(v), GFP_KERNEL);
}

static bool nm_failure_take(struct nm_area *area, unsigned long idx, int *err,
			    bool *oom)
{
	void *entry = xa_erase(&area->failed, idx);
	unsigned long v;

	if (!xa_is_value(entry))
		return false;
	v = xa_to_value(entry);
	if (!time_before(jiffies, (v >> 16) + HZ))
		return false;
	*err = -(int)(v & 0x7fff);
	*oom = v & 0x8000;
	return true;
}

/*
 * Let go of the lock the fault holds, before waiting for the daemon. Our vma
 * has no ->map_pages, so the fault core (6.12) never calls .fault under the
 * per-VMA lock: it is always mmap_lock, held for reading.
 */
static void nm_release_fault_lock(struct vm_fault *vmf)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 5, 0)
	release_fault_lock(vmf);
#else
	mmap_read_unlock(vmf->vma->vm_mm);
#endif
}

static vm_fault_t nm_fault(struct vm_fault *vmf)
{
	struct nm_area *area = vmf->vma->vm_private_data;
	unsigned long idx = vmf->pgoff;
	struct folio *folio;
	struct page *page;
	bool oom = false;
	int err = 0;

	if (idx >= area->npages)
		return VM_FAULT_SIGBUS;
	page = nm_get_page(area, idx);
	if (!page && (vmf->flags & FAULT_FLAG_RETRY_NOWAIT))
		return VM_FAULT_RETRY;	/* the caller may not wait; it comes back */
	if (!page && fault_flag_allow_retry_first(vmf->flags)) {
		/*
		 * Wait without the lock, as userfaultfd does, so that mmap(),
		 * munmap() and /proc/PID/maps of the process do not wait
		 * behind one slow page. The vma may go meanwhile: the area is
		 * pinned. The page lands in the area, where the retried fault
		 * finds it, and a failure, which it reports.
		 */
		kref_get(&area->ref);
		nm_release_fault_lock(vmf);
		err = nm_fetch(area, idx, &oom);
		if (err)
			nm_failure_note(area, idx, err, oom);
		nm_area_put(area);
		return VM_FAULT_RETRY;
	}
	if (!page && !nm_failure_take(area, idx, &err, &oom)) {
		err = nm_fetch(area, idx, &oom);
		if (!err)
			page = nm_get_page(area, idx);
	}
	if (err) {
		pr_warn_ratelimited("fault on page %lu of segment %s (pid %d) failed: %s (%d); the task gets SIGBUS\n",
				    idx, area->segment, task_pid_nr(current),
				    nm_why(err), err);
		/*
		 * Only our own allocation failing is OOM: a daemon answering
		 * ENOMEM would have the task retry the fault for ever.
		 */
		return oom ? VM_FAULT_OOM : VM_FAULT_SIGBUS;
	}
	if (!page)
		return VM_FAULT_NOPAGE;	/* evicted at once: fault again */
	folio = page_folio(page);
	folio_lock(folio);
	if (folio->mapping != &area->mapping) {
		/* Evicted meanwhile; the access faults again and fetches it. */
		folio_unlock(folio);
		put_page(page);
		return VM_FAULT_NOPAGE;
	}
	/* Our reference is the PTE's; mapped with the lock held (eviction). */
	vmf->page = page;
	return VM_FAULT_LOCKED;
}

/* First write to a clean page: mark it for the next sync. */
static vm_fault_t nm_page_mkwrite(struct vm_fault *vmf)
{
	struct nm_area *area = vmf->vma->vm_private_data;
	struct folio *folio = page_folio(vmf->page);

	folio_lock(folio);
	if (folio->mapping != &area->mapping) {
		/* Evicted since it was mapped: its PTE is gone; fault again. */
		folio_unlock(folio);
		return VM_FAULT_NOPAGE;
	}
	/* Locked until the PTE is writable, so a sync cannot clean it first. */
	set_bit(folio->index, area->dirty);
	return VM_FAULT_LOCKED;
}

static void nm_vm_open(struct vm_area_struct *vma)
{
	struct nm_area *area = vma->vm_private_data;

	kref_get(&area->ref);
}

static void nm_vm_close(struct vm_area_struct *vma)
{
	nm_area_put(vma->vm_private_data);
}

static const struct vm_operations_struct nm_vm_ops = {
	.open = nm_vm_open,
	.close = nm_vm_close,
	.fault = nm_fault,
	.page_mkwrite = nm_page_mkwrite,
};

/* ---- sync --------------------------------------------------------------- */

static int nm_send_commit(struct nm_area *area, u32 type, u64 commit,
			  const void *payload, u32 count)
{
	struct nm_req *req = kzalloc(sizeof(*req), GFP_KERNEL);
	int err;

	if (!req)
		return -ENOMEM;
	req->msg.type = type;
	req->msg.area = area->id;
	req->msg.size = (u64)area->npages << PAGE_SHIFT;
	req->msg.commit = commit;
	req->msg.count = count;
	memcpy(req->msg.segment, area->segment, NETMEM_SEGMENT_MAX);
	if (payload) {
		req->payload = payload;
		req->msg.len = NETMEM_CHUNK_PAGES * sizeof(u64) +
			       count * PAGE_SIZE;
	}
	err = nm_submit(req, area->store,
			type == NETMEM_MSG_COMMIT_END ? sync_timeout_ms : timeout_ms);
	kfree(req);
	return err;
}

/*
 * Tell the daemon that sync @commit was given up (it may hold some of its pages
 * or be committing it): it drops what it has not sent, and commits nothing of
 * it after a newer sync. Nobody waits: if it cannot be queued, the daemon still
 * commits the area's syncs in order.
 */
static void nm_abort_commit(struct nm_area *area, u64 commit)
{
	struct nm_req *req = kzalloc(sizeof(*req), GFP_KERNEL);

	if (!req)
		return;
	req->nowait = true;
	req->msg.type = NETMEM_MSG_COMMIT_ABORT;
	req->msg.area = area->id;
	req->msg.size = (u64)area->npages << PAGE_SHIFT;
	req->msg.commit = commit;
	memcpy(req->msg.segment, area->segment, NETMEM_SEGMENT_MAX);
	nm_submit(req, area->store, 0);	/* frees req */
}

/*
 * Hand every dirty page to the daemon and have it commit them as one
 * transaction. Each page is write-protected (folio_mkclean) and copied under
 * its page lock, so a write after that faults into page_mkwrite, waits for
 * the lock, and marks the page for the next sync.
 */
static int nm_sync(struct nm_area *area)
{
	u64 *numbers;
	unsigned long *sent, idx;
	char *chunk, *data;
	u32 n = 0, total = 0;
	u64 commit;
	int err = 0;

	/* Zeroed: the daemon reads all NETMEM_CHUNK_PAGES page numbers. */
	chunk = kvzalloc(NETMEM_CHUNK_PAGES * (sizeof(u64) + PAGE_SIZE),
			 GFP_KERNEL);
	sent = kvcalloc(BITS_TO_LONGS(area->npages), sizeof(long), GFP_KERNEL);
	if (!chunk || !sent) {
		err = -ENOMEM;
		goto out_free;
	}
	numbers = (u64 *)chunk;
	data = chunk + NETMEM_CHUNK_PAGES * sizeof(u64);
	commit = ++area->commits;
	for_each_set_bit(idx, area->dirty, area->npages) {
		struct page *page = xa_load(&area->pages, idx);
		struct folio *folio;

		if (WARN_ON_ONCE(!page)) {
			clear_bit(idx, area->dirty);
			continue;
		}
		folio = page_folio(page);
		folio_lock(folio);
		folio_mkclean(folio);
		clear_bit(idx, area->dirty);
		set_bit(idx, sent);
		numbers[n] = idx;
		memcpy_from_page(data + n * PAGE_SIZE, page, 0, PAGE_SIZE);
		folio_unlock(folio);
		n++;
		total++;
		if (n == NETMEM_CHUNK_PAGES) {
			err = nm_send_commit(area, NETMEM_MSG_COMMIT_PAGES,
					     commit, chunk, n);
			if (err)
				goto out_redirty;
			n = 0;
		}
	}
	if (n) {
		/* The numbers of the chunk before are not the daemon's business. */
		memset(numbers + n, 0, (NETMEM_CHUNK_PAGES - n) * sizeof(*numbers));
		err = nm_send_commit(area, NETMEM_MSG_COMMIT_PAGES, commit,
				     chunk, n);
		if (err)
			goto out_redirty;
	}
	if (total)
		err = nm_send_commit(area, NETMEM_MSG_COMMIT_END, commit, NULL,
				     total);
	if (!err)
		goto out_free;
out_redirty:
	/*
	 * Not committed: the pages stay dirty for the next sync (none was
	 * evicted: eviction waits for area->lock), and the daemon is told to
	 * give this one up.
	 */
	for_each_set_bit(idx, sent, area->npages)
		set_bit(idx, area->dirty);
	nm_abort_commit(area, commit);
	pr_warn_ratelimited("sync of %u pages of segment %s failed: %s (%d); they stay dirty for the next sync\n",
			    total, area->segment, nm_why(err), err);
out_free:
	kvfree(sent);
	kvfree(chunk);
	return err;
}

/* ---- the file ----------------------------------------------------------- */

static int nm_open(struct inode *inode, struct file *file)
{
	struct nm_area *area = kzalloc(sizeof(*area), GFP_KERNEL);

	if (!area)
		return -ENOMEM;
	kref_init(&area->ref);
	address_space_init_once(&area->mapping);
	init_rwsem(&area->mapping.invalidate_lock);
	area->mapping.a_ops = &nm_aops;
	area->mapping.host = inode;
	mutex_init(&area->lock);
	xa_init(&area->pages);
	xa_init(&area->failed);
	INIT_LIST_HEAD(&area->node);
	spin_lock(&nm.lock);
	area->id = ++nm.next_area;
	spin_unlock(&nm.lock);
	file->private_data = area;
	/* This file's mappings link here, not into the device inode's. */
	file->f_mapping = &area->mapping;
	return 0;
}

static int nm_release(struct inode *inode, struct file *file)
{
	struct nm_area *area = file->private_data;

	if (area->provider)
		nm_provider_gone();
	nm_area_put(area);
	return 0;
}

/*
 * A name of 1..63 printable bytes, NUL-terminated in its buffer. A segment is
 * a file's path in the store's tree, so it may hold '/' (the daemon looks it
 * up one name at a time); a store's name may not.
 */
static bool nm_name_ok(const char *s, bool path)
{
	size_t len = strnlen(s, NETMEM_SEGMENT_MAX), i;

	if (len == 0 || len == NETMEM_SEGMENT_MAX)
		return false;
	for (i = 0; i < len; i++)
		if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f ||
		    (s[i] == '/' && !path))
			return false;
	return true;
}

static long nm_attach(struct nm_area *area, void __user *uarg)
{
	struct netmem_attach a;
	unsigned long npages;
	struct nm_req *req;
	int err;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (!nm_name_ok(a.segment, true) || !a.size || a.size % PAGE_SIZE ||
	    a.size > NETMEM_MAX_BYTES)
		return -EINVAL;
	npages = a.size >> PAGE_SHIFT;
	if (a.budget)
		a.budget = max_t(u64, a.budget, NETMEM_MIN_BUDGET);
	if (mutex_lock_killable(&area->lock))
		return -EINTR;
	err = -EBUSY;
	if (area->npages || area->provider)
		goto out_unlock;
	err = -ENOMEM;
	area->dirty = kvcalloc(BITS_TO_LONGS(npages), sizeof(long),
			       GFP_KERNEL);
	req = kzalloc(sizeof(*req), GFP_KERNEL);
	if (!area->dirty || !req)
		goto out_free;
	memcpy(area->segment, a.segment, NETMEM_SEGMENT_MAX);
	req->msg.type = NETMEM_MSG_OPEN;
	req->msg.area = area->id;
	req->msg.size = a.size;
	memcpy(req->msg.segment, a.segment, NETMEM_SEGMENT_MAX);
	err = nm_submit(req, NULL, timeout_ms);
	if (err)
		goto out_free;
	/* Served from now on only by daemons of the store that opened it. */
	memcpy(area->store, req->store, NETMEM_SEGMENT_MAX);
	kfree(req);
	area->budget = DIV_ROUND_UP_ULL(a.budget, PAGE_SIZE);
	mutex_lock(&nm_areas_lock);
	list_add_tail(&area->node, &nm_areas);
	mutex_unlock(&nm_areas_lock);
	/* Published last: mmap and faults read it without the lock. */
	smp_store_release(&area->npages, npages);
	mutex_unlock(&area->lock);
	return 0;
out_free:
	if (err != -EINVAL && err != -ENOSPC)
		pr_info_ratelimited("attaching segment %s failed: %s (%d)\n",
				    a.segment, nm_why(err), err);
	kfree(req);
	kvfree(area->dirty);
	area->dirty = NULL;
out_unlock:
	mutex_unlock(&area->lock);
	return err;
}

static long nm_provide(struct file *file, struct nm_area *area,
		       void __user *uarg)
{
	struct netmem_provide p;
	long err = 0;

	/* The provider sees and writes every area's pages. */
	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	if (copy_from_user(&p, uarg, sizeof(p)))
		return -EFAULT;
	if (!nm_name_ok(p.store, false))
		return -EINVAL;
	if (mutex_lock_killable(&area->lock))
		return -EINTR;
	spin_lock(&nm.lock);
	if (area->npages) {
		err = -EINVAL;
	} else if (nm.provider) {
		err = -EBUSY;
	} else {
		nm.provider = file;
		memcpy(nm.store, p.store, NETMEM_SEGMENT_MAX);
	}
	spin_unlock(&nm.lock);
	if (!err) {
		area->provider = true;
		memcpy(area->store, p.store, NETMEM_SEGMENT_MAX);
	}
	mutex_unlock(&area->lock);
	return err;
}

static long nm_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct nm_area *area = file->private_data;

	switch (cmd) {
	case NETMEM_IOC_ATTACH:
		return nm_attach(area, (void __user *)arg);
	case NETMEM_IOC_PROVIDE:
		return nm_provide(file, area, (void __user *)arg);
	case NETMEM_IOC_INVALIDATE:
		return nm_invalidate(file, (void __user *)arg);
	default:
		return -ENOTTY;
	}
}

static int nm_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct nm_area *area = file->private_data;
	/* Pairs with the smp_store_release() in nm_attach(). */
	unsigned long npages = smp_load_acquire(&area->npages);

	if (!npages)
		return -EINVAL;		/* attach first */
	/*
	 * VM_MAYSHARE, not VM_SHARED: a MAP_SHARED mapping of a file opened
	 * read-only has no VM_SHARED, and may still map the area to read it.
	 */
	if (!(vma->vm_flags & VM_MAYSHARE))
		return -EINVAL;		/* private copies would never sync */
	if (vma->vm_pgoff >= npages || vma_pages(vma) > npages - vma->vm_pgoff)
		return -EINVAL;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, VM_DONTEXPAND | VM_DONTDUMP);
#else
	vma->vm_flags |= VM_DONTEXPAND | VM_DONTDUMP;
#endif
	vma->vm_ops = &nm_vm_ops;
	vma->vm_private_data = area;
	kref_get(&area->ref);
	return 0;
}

static int nm_fsync(struct file *file, loff_t start, loff_t end, int datasync)
{
	struct nm_area *area = file->private_data;
	unsigned long resident;
	int err;

	/* Pairs with the smp_store_release() in nm_attach(). */
	if (!smp_load_acquire(&area->npages))
		return -EINVAL;
	if (mutex_lock_killable(&area->lock))
		return -EINTR;
	err = nm_sync(area);
	mutex_unlock(&area->lock);
	/* The pages it committed are clean now: back within the budget. */
	resident = atomic_long_read(&area->resident);
	if (area->budget && resident > area->budget)
		nm_evict(area, resident - area->budget);
	if (err == -ENOSPC || err == -EINTR || err == -ENOMEM)
		return err;
	return err ? -EIO : 0;
}

/*
 * The daemon reads the next request (it must offer NETMEM_MSG_MAX bytes). The
 * header is copied out before the request leaves nm.pending, so a copy that
 * fails loses nothing: the next read gets the same request. Reads are
 * serialized, so two readers never take one request.
 */
static ssize_t nm_read(struct file *file, char __user *buf, size_t count,
		       loff_t *ppos)
{
	struct netmem_msg msg;
	struct nm_req *req;
	ssize_t ret;

	if (file != READ_ONCE(nm.provider))
		return -EINVAL;
	if (count < NETMEM_MSG_MAX)
		return -EINVAL;
	if (mutex_lock_interruptible(&nm.read_lock))
		return -ERESTARTSYS;
	spin_lock(&nm.lock);
	while (list_empty(&nm.pending)) {
		spin_unlock(&nm.lock);
		ret = -EAGAIN;
		if (file->f_flags & O_NONBLOCK)
			goto out_unlock;
		ret = -ERESTARTSYS;
		if (wait_event_interruptible(nm.wq,
					     !list_empty_careful(&nm.pending)))
			goto out_unlock;
		spin_lock(&nm.lock);
	}
	msg = list_first_entry(&nm.pending, struct nm_req, node)->msg;
	spin_unlock(&nm.lock);

	ret = -EFAULT;
	if (copy_to_user(buf, &msg, sizeof(msg)))
		goto out_unlock;
	ret = sizeof(msg) + msg.len;
	spin_lock(&nm.lock);
	/* Only this reader takes requests off the head: still ours if there. */
	req = list_first_entry_or_null(&nm.pending, struct nm_req, node);
	if (!req || req->msg.id != msg.id) {
		/* Its waiter gave up meanwhile: the daemon's reply gets ENOENT. */
		spin_unlock(&nm.lock);
		goto out_unlock;
	}
	list_del_init(&req->node);
	if (req->nowait || msg.type == NETMEM_MSG_COMMIT_PAGES) {
		/* Claimed: its waiter (if any) keeps it until done. */
		xa_erase(&nm.reqs, msg.id);
		req->claimed = true;
	} else {
		req->read = true;
		req = NULL;	/* its waiter may give up and free it now */
	}
	spin_unlock(&nm.lock);

	if (req && req->nowait) {
		kfree(req);
	} else if (req) {
		/* A failed copy fails the sync; its pages stay dirty for the next. */
		req->status = copy_to_user(buf + sizeof(msg), req->payload,
					   msg.len) ? -EFAULT : 0;
		if (req->status)
			ret = -EFAULT;
		complete(&req->done);
	}
out_unlock:
	mutex_unlock(&nm.read_lock);
	return ret;
}

/*
 * The daemon answers a request: a struct netmem_reply, maybe a page. The page
 * is copied in before the request is looked up, so that a copy that faults
 * neither loses an accepted reply nor runs while the waiter cannot leave.
 */
static ssize_t nm_write(struct file *file, const char __user *buf,
			size_t count, loff_t *ppos)
{
	struct netmem_reply r;
	struct nm_req *req;
	bool with_page = count == sizeof(r) + PAGE_SIZE;
	void *bounce = NULL;
	ssize_t ret;

	if (file != READ_ONCE(nm.provider))
		return -EINVAL;
	if (count != sizeof(r) && !with_page)
		return -EINVAL;
	if (copy_from_user(&r, buf, sizeof(r)))
		return -EFAULT;
	if (r.status > 0 || r.status < -NM_MAX_DAEMON_ERRNO ||
	    r.flags & ~NETMEM_REPLY_HOLE)
		return -EINVAL;
	if (with_page) {
		bounce = kmalloc(PAGE_SIZE, GFP_KERNEL);
		if (!bounce)
			return -ENOMEM;
		if (copy_from_user(bounce, buf + sizeof(r), PAGE_SIZE)) {
			ret = -EFAULT;
			goto out_free;
		}
	}
	spin_lock(&nm.lock);
	req = xa_load(&nm.reqs, r.id);
	ret = -ENOENT;	/* its waiter gave up (timeout, kill), or not read yet */
	if (!req || !req->read)
		goto out_unlock;
	/* Page data exactly when a FETCH succeeded with one. */
	ret = -EINVAL;
	if (with_page != (req->msg.type == NETMEM_MSG_FETCH && !r.status &&
			  !(r.flags & NETMEM_REPLY_HOLE)))
		goto out_unlock;
	xa_erase(&nm.reqs, r.id);
	req->claimed = true;
	spin_unlock(&nm.lock);

	if (with_page) {
		/*
		 * The page is the waiter's, not mapped yet: nobody else sees it.
		 * memcpy_to_page() flushes the data cache after the copy.
		 */
		memcpy_to_page(req->page, 0, bounce, PAGE_SIZE);
	}
	req->status = r.status;
	complete(&req->done);
	kfree(bounce);
	return count;
out_unlock:
	spin_unlock(&nm.lock);
out_free:
	kfree(bounce);
	return ret;
}

static __poll_t nm_poll(struct file *file, poll_table *wait)
{
	__poll_t mask = EPOLLOUT | EPOLLWRNORM;

	/* Only the daemon's file has a queue to wait on. */
	if (file != READ_ONCE(nm.provider))
		return EPOLLERR | EPOLLHUP;
	poll_wait(file, &nm.wq, wait);
	if (!list_empty_careful(&nm.pending))
		mask |= EPOLLIN | EPOLLRDNORM;
	return mask;
}

static const struct file_operations nm_fops = {
	.owner = THIS_MODULE,
	.open = nm_open,
	.release = nm_release,
	.unlocked_ioctl = nm_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = nm_mmap,
	.fsync = nm_fsync,
	.read = nm_read,
	.write = nm_write,
	.poll = nm_poll,
	.llseek = noop_llseek,
};

static struct nm_dev nm = {
	.misc = {
		.minor = MISC_DYNAMIC_MINOR,
		.name = "netmem",
		.fops = &nm_fops,
		.mode = 0600,
	},
	.lock = __SPIN_LOCK_UNLOCKED(nm.lock),
	.pending = LIST_HEAD_INIT(nm.pending),
	.reqs = XARRAY_INIT(nm.reqs, 0),
	.wq = __WAIT_QUEUE_HEAD_INITIALIZER(nm.wq),
	.read_lock = __MUTEX_INITIALIZER(nm.read_lock),
};

/* ---- memory pressure ---------------------------------------------------- */

static unsigned long nm_shrink_count(struct shrinker *shrinker,
				     struct shrink_control *sc)
{
	/* Dirty pages are counted too: a guess, as the count may be. */
	return atomic_long_read(&nm_resident);
}

static unsigned long nm_shrink_scan(struct shrinker *shrinker,
				    struct shrink_control *sc)
{
	unsigned long freed = 0;
	struct nm_area *area;

	/*
	 * Areas on the list are not freed while the lock is held (free takes
	 * it first). Only tried: whoever holds it may be allocating.
	 */
	if (!mutex_trylock(&nm_areas_lock))
		return SHRINK_STOP;
	list_for_each_entry(area, &nm_areas, node) {
		if (freed >= sc->nr_to_scan)
			break;
		freed += nm_evict(area, sc->nr_to_scan - freed);
	}
	/* The areas tried first now go last. */
	if (!list_empty(&nm_areas))
		list_rotate_left(&nm_areas);
	mutex_unlock(&nm_areas_lock);
	return freed ? freed : SHRINK_STOP;
}

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 7, 0)
static struct shrinker *nm_shrinker;

static int nm_shrinker_register(void)
{
	nm_shrinker = shrinker_alloc(0, "netmem");
	if (!nm_shrinker)
		return -ENOMEM;
	nm_shrinker->count_objects = nm_shrink_count;
	nm_shrinker->scan_objects = nm_shrink_scan;
	shrinker_register(nm_shrinker);
	return 0;
}

static void nm_shrinker_unregister(void)
{
	shrinker_free(nm_shrinker);
}
#else
static struct shrinker nm_shrinker = {
	.count_objects = nm_shrink_count,
	.scan_objects = nm_shrink_scan,
	.seeks = DEFAULT_SEEKS,
};

static int nm_shrinker_register(void)
{
	return register_shrinker(&nm_shrinker, "netmem");
}

static void nm_shrinker_unregister(void)
{
	unregister_shrinker(&nm_shrinker);
}
#endif

static int __init nm_init(void)
{
	int err;

	/* The daemon and the uapi header count in pages of this size. */
	BUILD_BUG_ON(NETMEM_PAGE_BYTES != PAGE_SIZE);
	/* Request ids index nm.reqs and must not wrap. */
	BUILD_BUG_ON(sizeof(unsigned long) < sizeof(u64));
	err = nm_shrinker_register();
	if (err)
		return err;
	err = misc_register(&nm.misc);
	if (err) {
		pr_err("cannot register /dev/netmem: %d\n", err);
		nm_shrinker_unregister();
	}
	return err;
}

static void __exit nm_exit(void)
{
	/* Every open file holds a module reference: none is left here. */
	misc_deregister(&nm.misc);
	nm_shrinker_unregister();
}

module_init(nm_init);
module_exit(nm_exit);
MODULE_LICENSE("GPL");
MODULE_AUTHOR("netmemfs");
MODULE_DESCRIPTION("/dev/netmem: page faults served by the netmemfs daemon");
