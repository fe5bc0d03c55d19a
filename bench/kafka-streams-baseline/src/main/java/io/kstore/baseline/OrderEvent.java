package io.kstore.baseline;

/**
 * One order, as kstore's {@code kstore_core::orders::OrderEvent} defines it: JSON on the input
 * topic, keyed by customer id.
 */
record OrderEvent(
        String orderId,
        String customerId,
        long eventTimeMs,
        long amountCents,
        String deliveryAddress,
        String paymentInstrument,
        boolean freeDelivery) {}
