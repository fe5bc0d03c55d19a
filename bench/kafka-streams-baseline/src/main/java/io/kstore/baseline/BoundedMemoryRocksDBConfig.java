package io.kstore.baseline;

import java.util.Map;
import org.apache.kafka.streams.state.RocksDBConfigSetter;
import org.rocksdb.BlockBasedTableConfig;
import org.rocksdb.Cache;
import org.rocksdb.LRUCache;
import org.rocksdb.WriteBufferManager;

/**
 * Bounds the memory of every RocksDB store of the process, as the Kafka Streams memory
 * management guide recommends: one LRU block cache shared by all stores, index and filter
 * blocks kept in it (at high priority, top-level index pinned), and every memtable charged to
 * it through one shared WriteBufferManager. Without it each store (one per partition) gets its
 * own 50 MB cache and its own memtables, so memory grows with the partition count. The sizes
 * default to kstore's ({@code memory.block-cache-bytes}, {@code memory.write-buffer-bytes}),
 * so both systems run with the same RocksDB memory budget. Every other RocksDB option keeps
 * Kafka Streams' default.
 */
public final class BoundedMemoryRocksDBConfig implements RocksDBConfigSetter {
    /** The block cache, in bytes, shared by every store of the process. */
    static final String BLOCK_CACHE_BYTES = "kstore.baseline.rocksdb.block.cache.bytes";

    /** The memtable budget, in bytes, charged to the block cache. */
    static final String WRITE_BUFFER_BYTES = "kstore.baseline.rocksdb.write.buffer.bytes";

    /** The share of the cache kept for index and filter blocks (the guide's example). */
    private static final double INDEX_FILTER_BLOCK_RATIO = 0.1;

    private static Cache cache;
    private static WriteBufferManager writeBufferManager;

    private static synchronized void create(Map<String, Object> configs) {
        if (cache != null) {
            return;
        }
        long cacheBytes = Long.parseLong(String.valueOf(configs.get(BLOCK_CACHE_BYTES)));
        long writeBufferBytes = Long.parseLong(String.valueOf(configs.get(WRITE_BUFFER_BYTES)));
        cache = new LRUCache(cacheBytes, -1, false, INDEX_FILTER_BLOCK_RATIO);
        writeBufferManager = new WriteBufferManager(writeBufferBytes, cache);
    }

    @Override
    public void setConfig(String storeName, org.rocksdb.Options options, Map<String, Object> configs) {
        create(configs);
        BlockBasedTableConfig table = (BlockBasedTableConfig) options.tableFormatConfig();
        table.setBlockCache(cache);
        table.setCacheIndexAndFilterBlocks(true);
        table.setCacheIndexAndFilterBlocksWithHighPriority(true);
        table.setPinTopLevelIndexAndFilter(true);
        options.setWriteBufferManager(writeBufferManager);
        options.setTableFormatConfig(table);
    }

    @Override
    public void close(String storeName, org.rocksdb.Options options) {
        // The cache and the write buffer manager are shared by every store: never closed here.
    }
}
