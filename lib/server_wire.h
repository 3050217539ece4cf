/* SPDX-License-Identifier: MIT */
/*
 * server_wire.h - the part of the netmemfs server protocol (docs/protocol.md)
 * that libnetmem speaks itself: ReadInode (or ReadPages) out, Pages or Error
 * back.
 *
 * The agent does the handshake (and authentication) on a second connection
 * and hands it over; the handler then reads pages on it without a hop through
 * the agent. A frame is a big-endian u32 length and one msgpack array. Only
 * the msgpack forms the protocol allows are accepted; anything else is a
 * parse failure, and the caller stops using the connection.
 */
#ifndef NETMEM_SERVER_WIRE_H
#define NETMEM_SERVER_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define NM_SRV_READ_PAGES 9
#define NM_SRV_READ_INODE 17
#define NM_SRV_PAGES 68
#define NM_SRV_ERROR 127
/* ReadPages: 4 + 1 + 1 + 9 + (2 + 255) + 9 + 9 bytes at most. */
#define NM_SRV_REQUEST_MAX 290

static inline unsigned char *nm_put_u64(unsigned char *p, uint64_t v)
{
	int i;

	*p++ = 0xcf;
	for (i = 7; i >= 0; i--)
		*p++ = (unsigned char)(v >> (8 * i));
	return p;
}

/* Put the length of the body that ends at end in front of it (out[0..3]);
 * the whole frame's length. */
static inline size_t nm_srv_frame_end(unsigned char *out, unsigned char *end)
{
	size_t len = (size_t)(end - out) - 4;

	out[0] = (unsigned char)(len >> 24);
	out[1] = (unsigned char)(len >> 16);
	out[2] = (unsigned char)(len >> 8);
	out[3] = (unsigned char)len;
	return len + 4;
}

/* Encode ReadPages(id, segment, first, count) as one frame into out (at
 * least NM_SRV_REQUEST_MAX bytes); return its length. The segment name is
 * at most 255 bytes (netmem_map_opts checks). */
static inline size_t nm_srv_read_pages(unsigned char *out, uint64_t id,
				       const char *segment, uint64_t first,
				       uint64_t count)
{
	size_t n = strlen(segment);
	unsigned char *p = out + 4;

	*p++ = 0x95;			/* fixarray of 5 */
	*p++ = NM_SRV_READ_PAGES;	/* positive fixint */
	p = nm_put_u64(p, id);
	if (n < 32) {
		*p++ = (unsigned char)(0xa0 | n);
	} else {
		*p++ = 0xd9;
		*p++ = (unsigned char)n;
	}
	memcpy(p, segment, n);
	p += n;
	p = nm_put_u64(p, first);
	p = nm_put_u64(p, count);
	return nm_srv_frame_end(out, p);
}

/* Encode ReadInode(id, ino, first, count) as one frame into out (at least
 * NM_SRV_REQUEST_MAX bytes); return its length. */
static inline size_t nm_srv_read_inode(unsigned char *out, uint64_t id,
				       uint64_t ino, uint64_t first,
				       uint64_t count)
{
	unsigned char *p = out + 4;

	*p++ = 0x95;			/* fixarray of 5 */
	*p++ = NM_SRV_READ_INODE;	/* positive fixint */
	p = nm_put_u64(p, id);
	p = nm_put_u64(p, ino);
	p = nm_put_u64(p, first);
	p = nm_put_u64(p, count);
	return nm_srv_frame_end(out, p);
}

/* A bounds-checked reader over one frame's body. */
struct nm_mp {
	const unsigned char *p, *end;
};

static inline bool nm_mp_be(struct nm_mp *m, size_t bytes, uint64_t *v)
{
	size_t i;

	if ((size_t)(m->end - m->p) < bytes)
		return false;
	*v = 0;
	for (i = 0; i < bytes; i++)
		*v = *v << 8 | *m->p++;
	return true;
}

static inline bool nm_mp_uint(struct nm_mp *m, uint64_t *v)
{
	unsigned char c;

	if (m->p >= m->end)
		return false;
	c = *m->p++;
	if (c < 0x80) {
		*v = c;
		return true;
	}
	if (c >= 0xcc && c <= 0xcf)
		return nm_mp_be(m, (size_t)1 << (c - 0xcc), v);
	return false;
}

static inline bool nm_mp_array(struct nm_mp *m, uint64_t *n)
{
	unsigned char c;

	if (m->p >= m->end)
		return false;
	c = *m->p++;
	if ((c & 0xf0) == 0x90) {
		*n = c & 0x0f;
		return true;
	}
	if (c == 0xdc)
		return nm_mp_be(m, 2, n);
	if (c == 0xdd)
		return nm_mp_be(m, 4, n);
	return false;
}

/* A str (want_bin false) or a bin (true): its bytes stay in the frame. */
static inline bool nm_mp_bytes(struct nm_mp *m, bool want_bin,
			       const unsigned char **data, uint64_t *n)
{
	unsigned char c;
	bool ok;

	if (m->p >= m->end)
		return false;
	c = *m->p++;
	if (!want_bin && (c & 0xe0) == 0xa0) {
		*n = c & 0x1f;
		ok = true;
	} else if (want_bin && c >= 0xc4 && c <= 0xc6) {
		ok = nm_mp_be(m, (size_t)1 << (c - 0xc4), n);
	} else if (!want_bin && c >= 0xd9 && c <= 0xdb) {
		ok = nm_mp_be(m, (size_t)1 << (c - 0xd9), n);
	} else {
		return false;
	}
	if (!ok || (uint64_t)(m->end - m->p) < *n)
		return false;
	*data = m->p;
	m->p += *n;
	return true;
}

#endif /* NETMEM_SERVER_WIRE_H */
